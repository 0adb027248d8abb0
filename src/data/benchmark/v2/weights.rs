//! Fitted by `python3 scripts/fit_v2_type_weights.py` (it rewrites this file).

/// How often each type (`TYPES`: six kinds, then negation of any kind) is tried for a
/// wanted label (rows: entailment, neutral, contradiction).
pub(super) const TYPE_WEIGHTS: [[f64; 7]; 3] = [
    [0.123, 0.761, 2.01, 0.893, 0.932, 1.56, 0.717],
    [0.665, 0.992, 1.02, 0.999, 0.994, 1.36, 0.971],
    [1.78, 0.825, 0.806, 0.838, 0.812, 1.07, 0.874],
];
