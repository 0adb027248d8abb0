//! OFA's relative-position buckets and position-bias helpers.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// Bucket of the relative text distance `r = i - j` (query minus key), as an index into a
/// relative table of `2 * bucket_size - 1` rows. Distances up to `bucket_size / 2` keep their
/// own bucket; longer ones share log-spaced buckets up to `max_positions - 1`.
pub fn token_bucket(r: i64, bucket_size: usize, max_positions: usize) -> usize {
    let mid = (bucket_size / 2) as i64;
    let abs = r.abs();
    let bucket = if abs <= mid {
        r
    } else {
        let span = ((max_positions - 1) as f64 / mid as f64).ln();
        let log_pos =
            ((abs as f64 / mid as f64).ln() / span * (mid - 1) as f64).ceil() as i64 + mid;
        // Distances past max_positions would overflow the table; they share the last bucket.
        r.signum() * log_pos.min(bucket_size as i64 - 1)
    };
    (bucket + bucket_size as i64 - 1) as usize
}

/// Number of rows of OFA's image relative-position table for a bucket size.
pub fn image_rel_rows(bucket_size: usize) -> usize {
    (2 * bucket_size - 1) * (2 * bucket_size - 1) + 3
}

/// Image position id of the patch at (row, col): row stride is always `bucket_size`, 0 reserved.
pub fn image_position_id(row: usize, col: usize, bucket_size: usize) -> usize {
    row * bucket_size + col + 1
}

/// Bucket between two patches given as (row, col).
pub fn image_bucket(a: (usize, usize), b: (usize, usize), bucket_size: usize) -> usize {
    let span = 2 * bucket_size as i64 - 1;
    let dr = a.0 as i64 - b.0 as i64 + bucket_size as i64 - 1;
    let dc = a.1 as i64 - b.1 as i64 + bucket_size as i64 - 1;
    (dr * span + dc) as usize
}

/// `[n, n]` matrix of text buckets for positions 0..n, as u32 ids.
pub fn token_bucket_matrix(
    n: usize,
    bucket_size: usize,
    max_positions: usize,
    dev: &Device,
) -> Result<Tensor> {
    let ids: Vec<u32> = (0..n)
        .flat_map(|i| {
            (0..n)
                .map(move |j| token_bucket(i as i64 - j as i64, bucket_size, max_positions) as u32)
        })
        .collect();
    Tensor::from_vec(ids, (n, n), dev)
}

/// Text buckets of one query position `t` against keys 0..=t: `[t+1]`.
pub fn token_bucket_row(
    t: usize,
    bucket_size: usize,
    max_positions: usize,
    dev: &Device,
) -> Result<Tensor> {
    let ids: Vec<u32> = (0..=t)
        .map(|j| token_bucket(t as i64 - j as i64, bucket_size, max_positions) as u32)
        .collect();
    Tensor::from_vec(ids, t + 1, dev)
}

/// `[p, p]` matrix of image buckets for a `side x side` patch grid (row-major).
pub fn image_bucket_matrix(side: usize, bucket_size: usize, dev: &Device) -> Result<Tensor> {
    let cells: Vec<(usize, usize)> = (0..side)
        .flat_map(|r| (0..side).map(move |c| (r, c)))
        .collect();
    let ids: Vec<u32> = cells
        .iter()
        .flat_map(|&a| {
            cells
                .iter()
                .map(move |&b| image_bucket(a, b, bucket_size) as u32)
        })
        .collect();
    let p = cells.len();
    Tensor::from_vec(ids, (p, p), dev)
}

/// Image position ids for a `side x side` grid, row-major.
pub fn image_position_ids(side: usize, bucket_size: usize, dev: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = (0..side)
        .flat_map(|r| (0..side).map(move |c| image_position_id(r, c, bucket_size) as u32))
        .collect();
    Tensor::from_vec(ids, side * side, dev)
}

/// Look up a relative table `[rows, h]` with a bucket matrix `[n, m]`: `[1, h, n, m]`.
pub fn relative_bias(table: &Tensor, buckets: &Tensor) -> Result<Tensor> {
    let (n, m) = buckets.dims2()?;
    let h = table.dim(1)?;
    let flat = table.index_select(&buckets.flatten_all()?, 0)?; // [n*m, h]
    flat.reshape((n, m, h))?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// `base + relative_bias(table, buckets)` for `base` `[1, h, n, m]`: a layer's attention
/// bias. At inference (nothing tracks gradients, f32 on the CPU) one pass writes the sum
/// head by head; the composed form gathers `[n*m, h]`, transposes it with a strided copy and
/// adds, three passes over a tensor of OFA-Base's 12 x 576 x 576 image block per layer. The
/// same single addition per element: the same bits.
pub fn add_relative_bias(base: &Tensor, table: &Tensor, buckets: &Tensor) -> Result<Tensor> {
    let (n, m) = buckets.dims2()?;
    let (rows, h) = table.dims2()?;
    let fast = super::infer::fuses_inference(base)
        && super::infer::fuses_inference(table)
        && buckets.dtype() == DType::U32
        && base.dims() == [1, h, n, m]
        && n * m * rows > 0;
    if !fast {
        return base.broadcast_add(&relative_bias(table, buckets)?);
    }
    let ids = buckets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&b| b as usize >= rows) {
        candle_core::bail!("relative bias: bucket {bad} outside a table of {rows} rows");
    }
    // Head-major table: each head's lookups read one short row.
    let table_t = table.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    // Not zeroed first (that was 1.5% of an OFA-Base request): every element is written below.
    let mut out = Vec::with_capacity(h * n * m);
    {
        let (storage, layout) = base.storage_and_layout();
        let base = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("relative bias: f32 contiguous base expected"),
        };
        use rayon::prelude::*;
        out.spare_capacity_mut()[..h * n * m]
            .par_chunks_mut(n * m)
            .zip(base.par_chunks(n * m))
            .zip(table_t.par_chunks(rows))
            .for_each(|((o, b), t)| {
                for ((o, &b), &id) in o.iter_mut().zip(b).zip(&ids) {
                    o.write(b + t[id as usize]);
                }
            });
    }
    // SAFETY: the loop wrote all h x n x m elements: h chunks of n x m, each zipped with a
    // head's n x m base values and the n x m bucket ids.
    unsafe { out.set_len(h * n * m) };
    Tensor::from_vec(out, (1, h, n, m), base.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_relative_bias_is_the_composed_sum_bit_for_bit() {
        let dev = Device::Cpu;
        for &(h, n, m, rows) in &[(3, 5, 7, 11), (12, 33, 17, 64), (1, 1, 1, 2)] {
            let base = Tensor::randn(0f32, 1.0, (1, h, n, m), &dev).unwrap();
            let table = Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap();
            let ids: Vec<u32> = (0..n * m).map(|i| ((i * 7 + 3) % rows) as u32).collect();
            let buckets = Tensor::from_vec(ids, (n, m), &dev).unwrap();
            let want = base
                .broadcast_add(&relative_bias(&table, &buckets).unwrap())
                .unwrap();
            let got = add_relative_bias(&base, &table, &buckets).unwrap();
            assert_eq!(got.dims(), want.dims());
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&got), flat(&want), "h {h} n {n} m {m}");
        }
        // A bucket past the table is an error, not a panic.
        let base = Tensor::zeros((1, 2, 1, 2), DType::F32, &dev).unwrap();
        let table = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        let buckets = Tensor::from_vec(vec![0u32, 3], (1, 2), &dev).unwrap();
        let e = add_relative_bias(&base, &table, &buckets).unwrap_err();
        assert!(e.to_string().contains("bucket 3"), "{e}");
    }

    #[test]
    fn token_buckets_match_ofa_checkpoints() {
        // Values from OFA's bucket table (bucket 256, max positions 1024).
        for (r, want) in [
            (0, 255),
            (128, 383),
            (129, 384),
            (200, 411),
            (1023, 510),
            (-1023, 0),
            (-128, 127),
        ] {
            assert_eq!(token_bucket(r, 256, 1024), want, "r = {r}");
        }
    }

    #[test]
    fn image_buckets_match_ofa_layout() {
        assert_eq!(image_bucket((0, 0), (0, 0), 42), 41 * 83 + 41);
        assert_eq!(image_bucket((1, 0), (0, 2), 42), 42 * 83 + 39);
        assert_eq!(image_rel_rows(42), 6892);
        assert_eq!(image_position_id(1, 2, 42), 45);
    }
}
