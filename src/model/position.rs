//! OFA's relative-position buckets and position-bias helpers.

use candle_core::{Device, Result, Tensor};

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

#[cfg(test)]
mod tests {
    use super::*;

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
