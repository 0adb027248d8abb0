//! The exit loop's state: rows that leave a stack of layers one by one.
//!
//! A row is one sequence of a batch: an encoder stream of a sample, a beam of a decoding
//! step, a row of answer scoring. Every layer runs on the rows still active, gathered into
//! one batch (exited rows are not computed at all); each row's signal goes into its history,
//! the policy decides, and a row that exits keeps its latest state as its output. The
//! encoder streams, the decoder step and answer scoring all drive this one state.

use crate::exit::{ExitPolicy, LayerSignal, Prediction, Site};
use candle_core::{Result, Tensor};

/// Per-row states, histories, exit layers and cost of one pass through `layers` layers.
pub struct ExitRows {
    /// Each row's latest state `[1, n, d]`: its last layer output (its exit state once it
    /// has left).
    states: Vec<Tensor>,
    /// The last batch a layer produced and the rows it holds, so that the next layer over
    /// the same rows reads it without a copy.
    batch: Option<(Vec<usize>, Tensor)>,
    running: Vec<bool>,
    /// Layers run by each row (`layers` for a row that never exits).
    pub exit: Vec<usize>,
    /// The signal after each layer run, per row.
    pub history: Vec<Vec<LayerSignal>>,
    /// Multiply-adds executed per row.
    pub macs: Vec<u64>,
    layers: usize,
    site: Site,
}

impl ExitRows {
    /// One row per entry of `x` (`[rows, n, d]`), all active, about to run `layers` layers.
    pub fn new(x: &Tensor, layers: usize, site: Site) -> Result<Self> {
        let n = x.dim(0)?;
        Ok(Self {
            states: (0..n).map(|i| x.narrow(0, i, 1)).collect::<Result<_>>()?,
            batch: Some(((0..n).collect(), x.clone())),
            running: vec![true; n],
            exit: vec![layers; n],
            history: vec![Vec::new(); n],
            macs: vec![0; n],
            layers,
            site,
        })
    }

    /// Rows still running, in row order.
    pub fn active(&self) -> Vec<usize> {
        (0..self.running.len())
            .filter(|&r| self.running[r])
            .collect()
    }

    pub fn is_active(&self, r: usize) -> bool {
        self.running[r]
    }

    /// Latest state of row `r`.
    pub fn state(&self, r: usize) -> &Tensor {
        &self.states[r]
    }

    pub fn into_states(self) -> Vec<Tensor> {
        self.states
    }

    /// The states of rows `idx` as one batch `[idx.len(), n, d]`.
    pub fn gather(&self, idx: &[usize]) -> Result<Tensor> {
        if let Some((rows, x)) = &self.batch {
            if rows == idx {
                return Ok(x.clone());
            }
        }
        if idx.len() == 1 {
            return Ok(self.states[idx[0]].clone());
        }
        let parts: Vec<&Tensor> = idx.iter().map(|&r| &self.states[r]).collect();
        Tensor::cat(&parts, 0)
    }

    /// Add `per_row(r)` multiply-adds to each row of `idx`.
    pub fn charge(&mut self, idx: &[usize], per_row: impl Fn(usize) -> u64) {
        for &r in idx {
            self.macs[r] += per_row(r);
        }
    }

    /// Layer `layer` (0-based) turned rows `idx` into `y` (`[idx.len(), n, d]`, in that
    /// order). Stores the outputs, appends `signals` (one per row, or none where no decision
    /// follows: the last layer) to the histories and lets the policy stop rows; after the
    /// last layer every row of `idx` is done.
    pub fn update(
        &mut self,
        idx: &[usize],
        layer: usize,
        y: &Tensor,
        signals: Vec<LayerSignal>,
        policy: &dyn ExitPolicy,
    ) -> Result<()> {
        if !signals.is_empty() && signals.len() != idx.len() {
            candle_core::bail!("{} exit signals for {} rows", signals.len(), idx.len());
        }
        let last = layer + 1 >= self.layers;
        for (j, &r) in idx.iter().enumerate() {
            self.states[r] = y.narrow(0, j, 1)?;
            if let Some(s) = signals.get(j) {
                self.history[r].push(*s);
            }
            if last {
                self.running[r] = false;
            } else if policy.should_exit(self.site, &self.history[r], self.layers) {
                self.running[r] = false;
                self.exit[r] = layer + 1;
            }
        }
        // A strided view (one stream of a joint layer's output) is gathered by copy instead.
        self.batch = y.is_contiguous().then(|| (idx.to_vec(), y.clone()));
        Ok(())
    }

    /// Similarity after each layer run, per row.
    pub fn similarities(&self) -> Vec<Vec<f32>> {
        self.history
            .iter()
            .map(|h| h.iter().map(|s| s.similarity).collect())
            .collect()
    }
}

/// Signals of one layer from per-row similarities and, when the policy reads them,
/// intermediate predictions.
pub fn signals(similarity: Vec<f32>, predictions: Option<Vec<Prediction>>) -> Vec<LayerSignal> {
    similarity
        .into_iter()
        .enumerate()
        .map(|(j, similarity)| LayerSignal {
            similarity,
            prediction: predictions.as_ref().map(|p| p[j]),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{FullDepth, Stream};
    use candle_core::Device;

    /// Exits a row once its similarity reaches 0.5.
    #[derive(Debug)]
    struct AtHalf;
    impl ExitPolicy for AtHalf {
        fn name(&self) -> String {
            "at-half".into()
        }
        fn should_exit(&self, _: Site, history: &[LayerSignal], _: usize) -> bool {
            history.last().is_some_and(|s| s.similarity >= 0.5)
        }
    }

    fn rows(n: usize) -> ExitRows {
        let x = Tensor::arange(0f32, (n * 2) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n, 1, 2))
            .unwrap();
        ExitRows::new(&x, 3, Site::Encoder(Stream::Text)).unwrap()
    }

    #[test]
    fn exited_rows_leave_the_batch_and_keep_their_state() {
        let mut r = rows(3);
        assert_eq!(r.active(), vec![0, 1, 2]);
        let y = (r.gather(&[0, 1, 2]).unwrap() + 100.0).unwrap();
        r.charge(&[0, 1, 2], |i| 10 + i as u64);
        r.update(
            &[0, 1, 2],
            0,
            &y,
            signals(vec![0.1, 0.9, 0.2], None),
            &AtHalf,
        )
        .unwrap();
        assert_eq!(r.active(), vec![0, 2]);
        assert!(!r.is_active(1));
        assert_eq!(r.exit, vec![3, 1, 3]);
        let g = r.gather(&[0, 2]).unwrap();
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![100.0, 101.0, 104.0, 105.0]
        );
        let y2 = (g + 100.0).unwrap();
        r.charge(&[0, 2], |_| 1);
        r.update(&[0, 2], 1, &y2, signals(vec![0.2, 0.7], None), &AtHalf)
            .unwrap();
        assert_eq!(r.active(), vec![0]);
        let y3 = (r.gather(&[0]).unwrap() + 100.0).unwrap();
        r.update(&[0], 2, &y3, Vec::new(), &AtHalf).unwrap();
        assert!(r.active().is_empty());
        assert_eq!(r.exit, vec![3, 1, 2]);
        assert_eq!(r.macs, vec![11, 11, 13]);
        assert_eq!(
            r.similarities(),
            vec![vec![0.1, 0.2], vec![0.9], vec![0.2, 0.7]]
        );
        let out: Vec<Vec<f32>> = (0..3)
            .map(|i| r.state(i).flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        assert_eq!(
            out,
            vec![vec![300.0, 301.0], vec![102.0, 103.0], vec![204.0, 205.0]]
        );
    }

    #[test]
    fn the_last_layer_ends_every_row_and_full_depth_never_exits_early() {
        let mut r = rows(2);
        for layer in 0..3 {
            let idx = r.active();
            assert_eq!(idx, vec![0, 1], "layer {layer}");
            let y = r.gather(&idx).unwrap();
            r.update(&idx, layer, &y, signals(vec![1.0, 1.0], None), &FullDepth)
                .unwrap();
        }
        assert!(r.active().is_empty());
        assert_eq!(r.exit, vec![3, 3]);
        let y = r.gather(&[0, 1]).unwrap();
        let bad = r.update(&[0, 1], 0, &y, signals(vec![1.0], None), &FullDepth);
        assert!(bad.is_err());
    }
}
