//! What a policy family declares beside its implementation (the vocabulary of the
//! registry in `spec.rs`, which lists the families): its name and titles, its role in the
//! report's table, its plot style, and the trait its grid points implement. It knows no
//! family, so the family files and the registry depend on it and not on each other.

use super::schedule::DecoderThreshold;
use super::ExitPolicy;
use anyhow::{bail, Result};

/// Where a family sits in the report's table, laid out like the paper's (OFA-Base, OFA-Tiny,
/// DeeBERT, PABEE, MuE, MuE w/o modality decomposition); the order of the variants is the
/// order of the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Full depth: what every figure is relative to.
    Reference,
    /// Fixed depths, the smaller-model baseline (its table shows fixed depths as well).
    SmallerModel,
    /// An early-exit baseline: its point is picked by MuE's rule and compared with MuE's.
    Baseline,
    /// The method.
    Proposed,
    /// An ablation of the method: picked and compared like a baseline, shown after MuE.
    Ablation,
}

impl Role {
    /// Whether reports pick a point of the family by MuE's rule and compare MuE with it.
    pub fn compared(self) -> bool {
        matches!(self, Role::SmallerModel | Role::Baseline | Role::Ablation)
    }
}

/// How plots draw a family's points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Circle,
    Square,
    Triangle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// RGB.
    pub color: (u8, u8, u8),
    pub marker: Marker,
}

/// The command line's policy parameters (`mue eval --policy NAME`), shared by the families:
/// each reads the ones it needs.
#[derive(Debug, Clone, Copy)]
pub struct Flags {
    /// `--threshold` (joint, entropy, margin).
    pub threshold: Option<f32>,
    /// `--patience`.
    pub patience: usize,
    /// `--depth`.
    pub depth: usize,
    /// The MuE thresholds of `--img/--text/--dec-threshold` over the model's exits.json.
    pub image: f32,
    pub text: f32,
    pub decoder: DecoderThreshold,
}

impl Flags {
    /// `--threshold`, which `family` needs.
    pub fn threshold(&self, family: &str) -> Result<f32> {
        match self.threshold {
            Some(t) => Ok(t),
            None => bail!("--policy {family} needs --threshold"),
        }
    }
}

/// What the rest of the program knows about a family.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// The `policy` tag of grid files, `--policy` and `--policies` values, sweep rows.
    pub name: &'static str,
    /// How the report's tables name it.
    pub title: &'static str,
    /// Help of `--policy NAME`.
    pub help: &'static str,
    pub role: Role,
    /// Its points are MuE thresholds (`PolicySpec::as_mue`): `mue calibrate` picks among
    /// them.
    pub calibrated: bool,
    pub style: Style,
}

/// A family's parameters: one grid point (its serde form is the grid file's).
pub trait Params {
    /// `key=value` pairs separated by spaces, as sweeps and reports print them.
    fn params(&self) -> String;
    /// The policy; every parameter is validated here, the one place.
    fn build(&self) -> Result<Box<dyn ExitPolicy>>;
    /// The family's default sweep grid for a model with `decoder_layers` decoder layers.
    fn grid(decoder_layers: usize) -> Vec<Self>
    where
        Self: Sized;
    /// The point `mue eval --policy NAME` runs, from the command line's flags.
    fn from_flags(flags: &Flags) -> Result<Self>
    where
        Self: Sized;
}
