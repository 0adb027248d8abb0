//! Analytic multiply-add (MAC) counts of what a request actually ran.
//!
//! Counted: every matrix product (projections, attention scores and weighted sums, FFN,
//! patch projection, ResNet convolutions, position biases, vocabulary projections). Not
//! counted: layer norms, softmax, activations and copies, which are small next to the
//! products.

use serde::{Deserialize, Serialize};

/// Executed work of one request beside the same request at full depth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Macs {
    pub executed: u64,
    pub full: u64,
}

impl Macs {
    /// Work that runs the same at any depth.
    pub fn fixed(&mut self, n: u64) {
        self.executed += n;
        self.full += n;
    }

    pub fn saved_fraction(&self) -> f64 {
        if self.full == 0 {
            0.0
        } else {
            1.0 - self.executed as f64 / self.full as f64
        }
    }
}

impl std::ops::AddAssign for Macs {
    fn add_assign(&mut self, o: Macs) {
        self.executed += o.executed;
        self.full += o.full;
    }
}

/// One encoder layer: `nq` query tokens attending over `nk` key tokens.
pub fn encoder_layer(nq: u64, nk: u64, d: u64, ffn: u64) -> u64 {
    2 * nq * d * d + 2 * nk * d * d + 2 * nq * nk * d + 2 * nq * d * ffn
}

/// One decoder layer for `n` new tokens with `t_keys` self-attention keys (cache included)
/// over `n_mem` memory positions (cross keys/values counted separately).
pub fn decoder_layer(n: u64, t_keys: u64, n_mem: u64, d: u64, ffn: u64) -> u64 {
    4 * n * d * d + 2 * n * t_keys * d + 2 * n * d * d + 2 * n * n_mem * d + 2 * n * d * ffn
}

/// Cross-attention keys and values of one layer over the memory.
pub fn cross_key_value(n_mem: u64, d: u64) -> u64 {
    2 * n_mem * d * d
}

/// Keys and values of one skipped layer computed from an exit state ("propagate").
pub fn propagate(d: u64) -> u64 {
    2 * d * d
}

/// Absolute position bias between `nq` and `nk` positions (two projections, one product).
pub fn position_bias(nq: u64, nk: u64, d: u64) -> u64 {
    (nq + nk) * d * d + nq * nk * d
}
