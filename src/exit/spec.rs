//! The policy registry: every exit policy family declares, next to its implementation, its
//! name, parameters (a serde struct), validation, default sweep grid, command-line form and
//! plot style. The CLI parses `--policy` from it; sweeps, reports, plots and calibration
//! iterate it. Adding a policy is one file (its `ExitPolicy`, its parameters implementing
//! [`Params`], its [`Family`]) and one line in [`registry!`] below.

use super::{
    entropy, joint_similarity, margin, mue, patience, static_depth, EntropyPolicy, ExitPolicy,
    FullDepth, JointSpec, MarginPolicy, MuePolicy, MueSpec, PatiencePolicy, StaticSpec,
};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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
    pub mue: MuePolicy,
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
    /// Its points are MuE thresholds ([`PolicySpec::as_mue`]): `mue calibrate` picks among
    /// them.
    pub calibrated: bool,
    pub style: Style,
    /// The default sweep grid for a model with this many decoder layers.
    pub grid: fn(usize) -> Vec<PolicySpec>,
    /// The point `mue eval --policy NAME` runs.
    pub from_flags: fn(&Flags) -> Result<PolicySpec>,
}

/// A family's parameters: one grid point.
pub trait Params {
    /// `key=value` pairs separated by spaces, as sweeps and reports print them.
    fn params(&self) -> String;
    /// The policy; every parameter is validated here, the one place.
    fn build(&self) -> Result<Box<dyn ExitPolicy>>;
    /// The MuE thresholds this point stands for (families with `calibrated`).
    fn as_mue(&self) -> Option<MuePolicy> {
        None
    }
    /// Whether the decoder threshold follows the schedule (MuE points only).
    fn decoder_schedule(&self) -> Option<bool> {
        None
    }
}

/// The registry: `Variant(parameters) => family`. The variant, lower-cased, is the
/// family's name (the `policy` tag of grid files); the order is the plotting order.
macro_rules! registry {
    ($($variant:ident($params:ty) => $family:expr),* $(,)?) => {
        /// A policy and its parameters, as a sweep grid lists them
        /// (`{"policy": "entropy", "threshold": 0.5}`).
        #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "policy", rename_all = "lowercase")]
        pub enum PolicySpec {
            $($variant($params)),*
        }

        impl PolicySpec {
            fn inner(&self) -> &dyn Params {
                match self {
                    $(PolicySpec::$variant(p) => p),*
                }
            }

            /// The family's registry entry.
            pub fn entry(&self) -> &'static Family {
                match self {
                    $(PolicySpec::$variant(_) => &$family),*
                }
            }
        }

        /// Every registered family, in plotting order.
        pub const FAMILIES: &[Family] = &[$($family),*];
    };
}

registry! {
    Mue(MueSpec) => mue::FAMILY,
    Joint(JointSpec) => joint_similarity::FAMILY,
    Entropy(EntropyPolicy) => entropy::FAMILY,
    Patience(PatiencePolicy) => patience::FAMILY,
    Margin(MarginPolicy) => margin::FAMILY,
    Static(StaticSpec) => static_depth::FAMILY,
    Full(FullDepth) => super::FULL,
}

impl PolicySpec {
    /// The family's name.
    pub fn family(&self) -> &'static str {
        self.entry().name
    }

    pub fn params(&self) -> String {
        self.inner().params()
    }

    pub fn build(&self) -> Result<Box<dyn ExitPolicy>> {
        self.inner().build()
    }

    pub fn as_mue(&self) -> Option<MuePolicy> {
        self.inner().as_mue()
    }

    pub fn decoder_schedule(&self) -> Option<bool> {
        self.inner().decoder_schedule()
    }

    /// The full-depth reference point.
    pub fn is_full(&self) -> bool {
        matches!(self, PolicySpec::Full(_))
    }
}

/// The registry entry named `name`.
pub fn family(name: &str) -> Result<&'static Family> {
    match FAMILIES.iter().find(|f| f.name == name) {
        Some(f) => Ok(f),
        None => bail!(
            "unknown policy family {name:?}; expected one of {}",
            names().join(", ")
        ),
    }
}

/// Every family's name, in registry order.
pub fn names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.name).collect()
}

/// The families of `role`, in registry order.
pub fn with_role(role: Role) -> impl Iterator<Item = &'static Family> {
    FAMILIES.iter().filter(move |f| f.role == role)
}

/// The families reports compare with MuE, in the order of the paper's table.
pub fn compared() -> Vec<&'static Family> {
    let mut f: Vec<&'static Family> = FAMILIES.iter().filter(|f| f.role.compared()).collect();
    f.sort_by_key(|f| f.role);
    f
}

/// The default grid of every family for a model with `decoder_layers` decoder layers, full
/// depth first (the reference a sweep reads first), then the families in registry order.
pub fn default_grid(decoder_layers: usize) -> Vec<PolicySpec> {
    let mut g: Vec<PolicySpec> = FAMILIES
        .iter()
        .flat_map(|f| (f.grid)(decoder_layers))
        .collect();
    g.sort_by_key(|s| !s.is_full());
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_consistent_with_its_entry() {
        let mut colors = Vec::new();
        for f in FAMILIES {
            assert_eq!(family(f.name).unwrap().name, f.name);
            assert!(!f.title.is_empty() && !f.help.is_empty(), "{}", f.name);
            assert!(
                !colors.contains(&f.style.color),
                "{}: colour reused",
                f.name
            );
            colors.push(f.style.color);
            let grid = (f.grid)(6);
            assert!(!grid.is_empty(), "{}: empty default grid", f.name);
            for s in grid {
                // The serde tag is the family's name, and the point is its family's.
                let v = serde_json::to_value(s).unwrap();
                assert_eq!(v["policy"], f.name);
                assert_eq!(s.family(), f.name);
                assert_eq!(s.as_mue().is_some(), f.calibrated, "{}", f.name);
                s.build().unwrap();
            }
            // Every family runs from the command line's defaults.
            let flags = Flags {
                threshold: Some(0.5),
                patience: 2,
                depth: 3,
                mue: MuePolicy::never(),
            };
            let s = (f.from_flags)(&flags).unwrap();
            assert_eq!(s.family(), f.name);
            assert!(s.build().is_ok());
        }
        assert!(family("nothing").unwrap_err().to_string().contains("mue"));
        let fams: Vec<&str> = compared().iter().map(|f| f.name).collect();
        assert_eq!(fams, ["static", "entropy", "patience", "margin", "joint"]);
        assert!(default_grid(6)[0].is_full());
    }

    #[test]
    fn validation_is_in_one_place() {
        let flags = |threshold, depth| Flags {
            threshold,
            patience: 2,
            depth,
            mue: MuePolicy::never(),
        };
        let build = |name: &str, f: Flags| (family(name).unwrap().from_flags)(&f)?.build();
        assert!(build("static", flags(None, 0)).is_err());
        assert!(PolicySpec::Static(StaticSpec { depth: 0 }).build().is_err());
        let e = build("entropy", flags(None, 1)).err().unwrap().to_string();
        assert!(e.contains("--policy entropy needs --threshold"), "{e}");
        for name in ["joint", "entropy", "margin"] {
            assert!(build(name, flags(Some(f32::NAN), 1)).is_err(), "{name}");
        }
        // A unit family reads and writes its tag alone.
        let full: PolicySpec = serde_json::from_str(r#"{"policy": "full"}"#).unwrap();
        assert!(full.is_full());
        assert_eq!(
            serde_json::to_string(&full).unwrap(),
            r#"{"policy":"full"}"#
        );
    }
}
