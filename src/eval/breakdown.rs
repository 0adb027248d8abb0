//! Quality and exits per group of examples (difficulty tier, hypothesis type), read from
//! the benchmark's `meta_<split>.tsv`: early exiting should spend less on easy inputs.

use super::eval::{exit_stats, mac_reduction, Dataset, ExitStats, RunOutputs};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Tier and hypothesis type of one example (`-` for captions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleMeta {
    pub tier: String,
    pub kind: String,
}

/// The `meta_<split>.tsv` beside a split file named `snli_ve_<split>.tsv` or
/// `caption_<split>.tsv`, if there is one.
pub fn meta_path(data_path: &Path) -> Option<PathBuf> {
    let name = data_path.file_name()?.to_str()?;
    let split = name
        .strip_suffix(".tsv")?
        .strip_prefix("snli_ve_")
        .or_else(|| name.strip_suffix(".tsv")?.strip_prefix("caption_"))?;
    let p = data_path.with_file_name(format!("meta_{split}.tsv"));
    p.is_file().then_some(p)
}

/// Rows `id, task, image_id, tier, type` by id.
pub fn load_meta(path: &Path) -> Result<HashMap<String, ExampleMeta>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 5 {
            anyhow::bail!(
                "{} line {}: expected 5 tab-separated fields (id, task, image_id, tier, type), got {}",
                path.display(),
                i + 1,
                f.len()
            );
        }
        out.insert(
            f[0].to_string(),
            ExampleMeta {
                tier: f[3].to_string(),
                kind: f[4].to_string(),
            },
        );
    }
    Ok(out)
}

/// One group's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// `tier=0`, `type=counting`, ...
    pub group: String,
    pub examples: usize,
    /// Entailment accuracy with the policy and at full depth (None for captions).
    pub accuracy: Option<f64>,
    pub full_accuracy: Option<f64>,
    pub exits: ExitStats,
    /// 1 - executed / full-depth multiply-adds within the group.
    pub macs_reduction: f64,
}

/// Figures per tier and per hypothesis type. Examples without metadata are left out.
pub fn breakdown(
    data: &Dataset,
    run: &RunOutputs,
    full: &RunOutputs,
    meta: &HashMap<String, ExampleMeta>,
) -> Vec<GroupReport> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, e) in run.examples.iter().enumerate() {
        let Some(m) = meta.get(&e.id) else { continue };
        groups
            .entry(format!("tier={}", m.tier))
            .or_default()
            .push(i);
        if m.kind != "-" {
            groups
                .entry(format!("type={}", m.kind))
                .or_default()
                .push(i);
        }
    }
    let correct = |out: &RunOutputs, i: usize| match data {
        Dataset::Entail(rows) => Some(rows[i].label.as_str() == out.examples[i].prediction),
        Dataset::Caption(_) => None,
    };
    let accuracy = |out: &RunOutputs, idx: &[usize]| -> Option<f64> {
        let hits: Option<Vec<bool>> = idx.iter().map(|&i| correct(out, i)).collect();
        hits.map(|h| h.iter().filter(|&&c| c).count() as f64 / h.len().max(1) as f64)
    };
    groups
        .into_iter()
        .map(|(group, idx)| {
            let subset = RunOutputs {
                policy: run.policy.clone(),
                examples: idx.iter().map(|&i| run.examples[i].clone()).collect(),
                wall_ms: 0.0,
                cpu_ms: None,
            };
            GroupReport {
                examples: idx.len(),
                accuracy: accuracy(run, &idx),
                full_accuracy: accuracy(full, &idx),
                exits: exit_stats(&subset),
                macs_reduction: mac_reduction(&subset.examples),
                group,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_path_follows_the_split_name() {
        let dir = tempfile::tempdir().unwrap();
        let ve = dir.path().join("snli_ve_test.tsv");
        let cap = dir.path().join("caption_test.tsv");
        assert_eq!(meta_path(&ve), None);
        std::fs::write(dir.path().join("meta_test.tsv"), "1\tve\t1\t0\tpresence\n").unwrap();
        assert_eq!(meta_path(&ve), Some(dir.path().join("meta_test.tsv")));
        assert_eq!(meta_path(&cap), Some(dir.path().join("meta_test.tsv")));
        assert_eq!(meta_path(&dir.path().join("other.tsv")), None);
        let m = load_meta(&dir.path().join("meta_test.tsv")).unwrap();
        assert_eq!(m["1"].tier, "0");
        assert_eq!(m["1"].kind, "presence");
        std::fs::write(dir.path().join("meta_test.tsv"), "1\tve\t1\n").unwrap();
        let err = load_meta(&dir.path().join("meta_test.tsv")).unwrap_err();
        assert!(format!("{err:#}").contains("expected 5"), "{err:#}");
    }
}
