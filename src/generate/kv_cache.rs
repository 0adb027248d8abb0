//! The decoder's self-attention key/value cache, written in place.
//!
//! Each layer holds keys and values `[rows, h, capacity, dh]`; decoding step `t` writes
//! position `t` of the rows that computed it (the rows that ran the layer, or the rows that
//! exited below it and fill it), and attention reads positions `0..=t` as a view. The
//! buffers start at 32 positions (or the state's steps, if fewer) and double when full, so
//! a step allocates for the cache only when it grows, when exits gather a subset of rows,
//! and when beams are reordered.

use candle_core::{Result, Tensor};

/// Positions a fresh buffer holds.
const INITIAL_CAPACITY: usize = 32;

pub struct KvCache {
    /// Keys and values per layer, allocated at the layer's first write.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The most positions a buffer will ever need.
    max_steps: usize,
}

impl KvCache {
    pub fn new(layers: usize, max_steps: usize) -> Self {
        Self {
            layers: vec![None; layers],
            max_steps,
        }
    }

    /// Positions `0..len` of `layer` for every row: `[rows, h, len, dh]` views.
    pub fn get(&self, layer: usize, len: usize) -> Result<Option<(Tensor, Tensor)>> {
        match &self.layers[layer] {
            None => Ok(None),
            Some((k, v)) => Ok(Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))),
        }
    }

    /// The whole buffers of `layer`, `[rows, h, capacity, dh]` each, for reading in place.
    pub fn buffers(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match &self.layers[layer] {
            Some((k, v)) => Ok((k, v)),
            None => candle_core::bail!("key/value cache of layer {layer} read before any write"),
        }
    }

    /// Positions `0..len` of `layer` for the rows in `idx` (every row when `None`).
    pub fn read(&self, layer: usize, idx: Option<&Tensor>, len: usize) -> Result<(Tensor, Tensor)> {
        let Some((k, v)) = &self.layers[layer] else {
            candle_core::bail!("key/value cache of layer {layer} read before any write");
        };
        let (k, v) = match idx {
            None => (k.clone(), v.clone()),
            Some(i) => (k.index_select(i, 0)?, v.index_select(i, 0)?),
        };
        Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))
    }

    /// Store keys and values `[rows.len(), h, 1, dh]` of rows `rows` (ascending, out of
    /// `n_rows`) at position `t` of `layer`.
    pub fn write(
        &mut self,
        layer: usize,
        n_rows: usize,
        rows: &[usize],
        t: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        if t >= self.max_steps {
            candle_core::bail!("position {t} beyond the cache's {} steps", self.max_steps);
        }
        let (_, h, _, dh) = k.dims4()?;
        let entry = &mut self.layers[layer];
        let capacity = match entry.as_ref() {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        if t >= capacity {
            let grown = (2 * capacity)
                .max(INITIAL_CAPACITY)
                .max(t + 1)
                .min(self.max_steps);
            let zeros = || Tensor::zeros((n_rows, h, grown, dh), k.dtype(), k.device());
            let (nk, nv) = (zeros()?, zeros()?);
            if let Some((ok, ov)) = entry.as_ref() {
                nk.slice_set(ok, 2, 0)?;
                nv.slice_set(ov, 2, 0)?;
            }
            *entry = Some((nk, nv));
        }
        let (bk, bv) = entry.as_ref().unwrap();
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        // One copy per run of consecutive rows.
        let mut j = 0;
        while j < rows.len() {
            let mut end = j + 1;
            while end < rows.len() && rows[end] == rows[end - 1] + 1 {
                end += 1;
            }
            let n = end - j;
            bk.narrow(0, rows[j], n)?
                .slice_set(&k.narrow(0, j, n)?, 2, t)?;
            bv.narrow(0, rows[j], n)?
                .slice_set(&v.narrow(0, j, n)?, 2, t)?;
            j = end;
        }
        Ok(())
    }

    /// Keep rows `idx` (in that order, repeats allowed).
    pub fn reorder(&mut self, idx: &Tensor) -> Result<()> {
        for c in self.layers.iter_mut().flatten() {
            *c = (c.0.index_select(idx, 0)?, c.1.index_select(idx, 0)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn kv(rows: usize, base: f32) -> Tensor {
        Tensor::arange(base, base + (rows * 2 * 3) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, 2, 1, 3))
            .unwrap()
    }

    #[test]
    fn writes_land_at_their_rows_and_positions_across_growth_and_reorder() {
        let mut c = KvCache::new(1, 40);
        assert!(c.get(0, 0).unwrap().is_none());
        assert!(c.read(0, None, 1).is_err());
        // 35 steps: the buffer grows from 32 positions to 40 on the way.
        let mut want: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3]; // row -> position -> values
        for t in 0..35 {
            // Rows 0 and 2 compute position t first; row 1 fills it afterwards.
            let a = kv(2, 1000.0 * t as f32);
            let b = kv(1, 1000.0 * t as f32 + 500.0);
            c.write(0, 3, &[0, 2], t, &a, &a).unwrap();
            c.write(0, 3, &[1], t, &b, &b).unwrap();
            for (r, src, j) in [(0, &a, 0), (2, &a, 1), (1, &b, 0)] {
                let row = src.narrow(0, j, 1).unwrap().flatten_all().unwrap();
                want[r].push(row.to_vec1::<f32>().unwrap());
            }
        }
        let (k, v) = c.get(0, 35).unwrap().unwrap();
        assert_eq!(k.dims(), &[3, 2, 35, 3]);
        let got = |t: &Tensor, r: usize, p: usize| -> Vec<f32> {
            t.narrow(0, r, 1)
                .unwrap()
                .narrow(2, p, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for (r, positions) in want.iter().enumerate() {
            for (p, w) in positions.iter().enumerate() {
                assert_eq!(&got(&k, r, p), w, "row {r} position {p}");
                assert_eq!(&got(&v, r, p), w);
            }
        }
        // Rows 2 and 0 read through an index, then a reorder keeps row 2 twice.
        let idx = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let (k2, _) = c.read(0, Some(&idx), 35).unwrap();
        assert_eq!(got(&k2, 0, 7), want[2][7]);
        assert_eq!(got(&k2, 1, 7), want[0][7]);
        c.reorder(&Tensor::new(&[2u32, 2], &Device::Cpu).unwrap())
            .unwrap();
        let (k3, _) = c.read(0, None, 35).unwrap();
        assert_eq!(k3.dims(), &[2, 2, 35, 3]);
        assert_eq!(got(&k3, 1, 34), want[2][34]);
        // Beyond the state's steps is an error, not a silent write.
        let one = Tensor::zeros((1, 2, 1, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(c.write(0, 2, &[0], 40, &one, &one).is_err());
    }
}
