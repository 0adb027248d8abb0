pub mod eval;
pub mod model;
