//! The policy registry: the list of exit policy families. Each family declares, next to
//! its implementation, its name, parameters (a serde struct implementing [`Params`]),
//! validation, default sweep grid, command-line form and plot style ([`Family`]). The CLI
//! parses `--policy` from this list; sweeps, reports, plots and calibration iterate it.
//! Adding a policy is its file (with `pub mod` in `exit/mod.rs`) and one line in
//! [`registry!`] below.

pub use super::family::{Family, Flags, Marker, Params, Role, Style};
use super::{
    entropy, joint_similarity, margin, mue, patience, static_depth, EntropyPolicy, ExitPolicy,
    FullDepth, JointSpec, MarginPolicy, MuePolicy, MueSpec, PatiencePolicy, StaticSpec,
};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// A registered family: its declaration, and its grid and command-line points as
/// [`PolicySpec`]s. Reads as its [`Family`] (`entry.name`, `entry.style`).
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub family: &'static Family,
    /// The default sweep grid for a model with this many decoder layers.
    pub grid: fn(usize) -> Vec<PolicySpec>,
    /// The point `mue eval --policy NAME` runs.
    pub from_flags: fn(&Flags) -> Result<PolicySpec>,
}

impl std::ops::Deref for Entry {
    type Target = Family;
    fn deref(&self) -> &Family {
        self.family
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

            /// The family's declaration.
            pub fn entry(&self) -> &'static Family {
                match self {
                    $(PolicySpec::$variant(_) => &$family),*
                }
            }
        }

        /// Every registered family, in plotting order.
        pub const FAMILIES: &[Entry] = &[$(Entry {
            family: &$family,
            grid: |layers| {
                <$params as Params>::grid(layers)
                    .into_iter()
                    .map(PolicySpec::$variant)
                    .collect()
            },
            from_flags: |flags| <$params as Params>::from_flags(flags).map(PolicySpec::$variant),
        }),*];
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

    /// The MuE thresholds this point stands for: MuE's own points and joint's (equal image
    /// and text thresholds), what `mue calibrate` picks among (families with `calibrated`).
    pub fn as_mue(&self) -> Option<MuePolicy> {
        match self {
            PolicySpec::Mue(p) => p.policy().ok(),
            PolicySpec::Joint(p) => p.policy().ok().map(|j| j.as_mue()),
            _ => None,
        }
    }

    /// Whether a MuE point's decoder threshold follows the schedule (None for other points).
    pub fn decoder_schedule(&self) -> Option<bool> {
        match self {
            PolicySpec::Mue(p) => Some(p.decoder.is_schedule()),
            _ => None,
        }
    }

    /// The full-depth reference point.
    pub fn is_full(&self) -> bool {
        matches!(self, PolicySpec::Full(_))
    }
}

/// The registry entry named `name`.
pub fn family(name: &str) -> Result<&'static Entry> {
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
pub fn with_role(role: Role) -> impl Iterator<Item = &'static Entry> {
    FAMILIES.iter().filter(move |f| f.role == role)
}

/// The families reports compare with MuE, in the order of the paper's table.
pub fn compared() -> Vec<&'static Entry> {
    let mut f: Vec<&'static Entry> = FAMILIES.iter().filter(|f| f.role.compared()).collect();
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
            let never = MuePolicy::never();
            let flags = Flags {
                threshold: Some(0.5),
                patience: 2,
                depth: 3,
                image: never.image,
                text: never.text,
                decoder: never.decoder,
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
            image: 1.0,
            text: 1.0,
            decoder: crate::exit::DecoderThreshold::Constant { tau: 1.0 },
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
