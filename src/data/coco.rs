//! COCO captions in the Karpathy split (`dataset_coco.json`) with an image folder.
//!
//! The JSON is `{"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
//! "split": "test", "sentences": [{"raw": "A man ..."}, ...], "cocoid": 391895}, ...]}`
//! with splits `train`, `restval`, `val` and `test`. The file is read once; images are
//! located (path joined) by [`CocoKarpathy::split`] and decoded by
//! [`CocoKarpathy::caption_rows`], which `mue eval --data dataset_coco.json --images DIR
//! --task caption` reads (the `test` split).

use super::preprocess::load_image;
use super::tsv::CaptionRow;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image of the split with its reference captions.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoItem {
    /// `cocoid`.
    pub id: u64,
    /// `image_root / filepath / filename` (`filepath` may be absent).
    pub image: PathBuf,
    /// The `raw` text of every sentence, in file order.
    pub captions: Vec<String>,
}

/// A parsed `dataset_coco.json`.
#[derive(Debug, Clone)]
pub struct CocoKarpathy {
    source: PathBuf,
    image_root: PathBuf,
    images: Vec<Value>,
}

impl CocoKarpathy {
    /// Reads `json_path`; image paths are resolved under `image_root`.
    pub fn open(json_path: &Path, image_root: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(json_path)
            .with_context(|| format!("cannot read {}", json_path.display()))?;
        Self::parse(&text, json_path, image_root)
    }

    /// Parses the JSON text (`source` is only used in error messages).
    pub fn parse(text: &str, source: &Path, image_root: &Path) -> Result<Self> {
        let mut root: Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not valid JSON", source.display()))?;
        let images = match root.get_mut("images").map(Value::take) {
            Some(Value::Array(a)) => a,
            Some(_) => bail!("{}: field `images` is not an array", source.display()),
            None => bail!("{}: missing field `images`", source.display()),
        };
        Ok(Self {
            source: source.to_path_buf(),
            image_root: image_root.to_path_buf(),
            images,
        })
    }

    /// Number of images per split name (entries without a valid `split` are not counted).
    pub fn split_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for e in &self.images {
            if let Some(s) = e.get("split").and_then(Value::as_str) {
                *m.entry(s.to_string()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Items of a split, in file order. `split` may join several names with `+`
    /// (e.g. `train+restval`, the usual Karpathy training set). Fails if no image has
    /// that split; a malformed entry yields an error naming its index and field.
    pub fn split<'a>(&'a self, split: &str) -> Result<impl Iterator<Item = Result<CocoItem>> + 'a> {
        let names: Vec<String> = split.split('+').map(|s| s.trim().to_string()).collect();
        let counts = self.split_counts();
        let total: usize = names.iter().filter_map(|n| counts.get(n)).sum();
        if total == 0 {
            bail!(
                "{}: no image has split `{split}` (splits present: {})",
                self.source.display(),
                counts
                    .iter()
                    .map(|(k, v)| format!("{k} ({v})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(self
            .images
            .iter()
            .enumerate()
            .filter_map(move |(i, e)| match e.get("split") {
                Some(Value::String(s)) if names.iter().any(|n| n == s) => Some(self.item(i, e)),
                Some(Value::String(_)) => None,
                Some(_) => Some(Err(self.field_err(i, "split", "is not a string"))),
                None => Some(Err(self.field_err(i, "split", "is missing"))),
            }))
    }

    /// The first `limit` items of `split` (all when `None`) as caption rows, images decoded
    /// (PNG or JPEG, at their own size: the engine resizes them as OFA does). An image that
    /// is missing or does not decode is an error naming its path.
    pub fn caption_rows(&self, split: &str, limit: Option<usize>) -> Result<Vec<CaptionRow>> {
        self.split(split)?
            .take(limit.unwrap_or(usize::MAX))
            .map(|item| {
                let item = item?;
                let image = load_image(&item.image).with_context(|| {
                    format!("COCO image {} (cocoid {})", item.image.display(), item.id)
                })?;
                Ok(CaptionRow {
                    id: item.id.to_string(),
                    image_id: item.id.to_string(),
                    captions: item.captions,
                    object_labels: String::new(),
                    image,
                })
            })
            .collect()
    }

    fn field_err(&self, index: usize, field: &str, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: images[{index}]: field `{field}` {what}",
            self.source.display()
        )
    }

    fn item(&self, i: usize, e: &Value) -> Result<CocoItem> {
        let id = match e.get("cocoid") {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.field_err(i, "cocoid", "is not a non-negative integer"))?,
            None => return Err(self.field_err(i, "cocoid", "is missing")),
        };
        let filename = match e.get("filename") {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(_) => return Err(self.field_err(i, "filename", "is not a non-empty string")),
            None => return Err(self.field_err(i, "filename", "is missing")),
        };
        let mut image = self.image_root.clone();
        match e.get("filepath") {
            Some(Value::String(s)) => image.push(s),
            Some(Value::Null) | None => {}
            Some(_) => return Err(self.field_err(i, "filepath", "is not a string")),
        }
        image.push(filename);
        let sentences = match e.get("sentences") {
            Some(Value::Array(a)) => a,
            Some(_) => return Err(self.field_err(i, "sentences", "is not an array")),
            None => return Err(self.field_err(i, "sentences", "is missing")),
        };
        let captions = sentences
            .iter()
            .enumerate()
            .map(|(j, s)| match s.get("raw") {
                Some(Value::String(r)) => Ok(r.clone()),
                Some(_) => {
                    Err(self.field_err(i, &format!("sentences[{j}].raw"), "is not a string"))
                }
                None => Err(self.field_err(i, &format!("sentences[{j}].raw"), "is missing")),
            })
            .collect::<Result<Vec<_>>>()?;
        if captions.is_empty() {
            return Err(self.field_err(i, "sentences", "is empty"));
        }
        Ok(CocoItem {
            id,
            image,
            captions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
         "sentences": [{"raw": "A man riding a bike.", "tokens": ["a"]}, {"raw": "A cyclist."}],
         "cocoid": 391895, "imgid": 0},
        {"filepath": "train2014", "filename": "a.jpg", "split": "train",
         "sentences": [{"raw": "Two dogs."}], "cocoid": 7},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval",
         "sentences": [{"raw": "A cat."}], "cocoid": 8},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "A bus."}], "cocoid": 9}
    ]}"#;

    fn ds(text: &str) -> CocoKarpathy {
        CocoKarpathy::parse(text, Path::new("dataset_coco.json"), Path::new("/coco")).unwrap()
    }

    #[test]
    fn reads_a_split() {
        let d = ds(JSON);
        let test: Vec<CocoItem> = d.split("test").unwrap().map(Result::unwrap).collect();
        assert_eq!(
            test,
            vec![
                CocoItem {
                    id: 391895,
                    image: PathBuf::from("/coco/val2014/COCO_val2014_000000391895.jpg"),
                    captions: vec!["A man riding a bike.".into(), "A cyclist.".into()],
                },
                CocoItem {
                    id: 9,
                    image: PathBuf::from("/coco/c.jpg"),
                    captions: vec!["A bus.".into()],
                },
            ]
        );
        let train: Vec<u64> = d
            .split("train+restval")
            .unwrap()
            .map(|r| r.unwrap().id)
            .collect();
        assert_eq!(train, [7, 8]);
        let counts = d.split_counts();
        assert_eq!(counts["test"], 2);
        assert_eq!(counts["train"], 1);
        let err = d.split("val").err().unwrap().to_string();
        assert!(err.contains("`val`") && err.contains("test (2)"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"images": [{"filename": "x.jpg", "split": "test", "sentences": [{"raw": "a"}]}]}"#,
                "images[0]: field `cocoid`",
            ),
            (
                r#"{"images": [{"cocoid": 1, "split": "test", "sentences": [{"raw": "a"}]}]}"#,
                "images[0]: field `filename`",
            ),
            (
                r#"{"images": [{"cocoid": 1, "filename": "x", "split": "test"}]}"#,
                "field `sentences`",
            ),
            (
                r#"{"images": [{"cocoid": 1, "filename": "x", "split": "test", "sentences": [{"text": "a"}]}]}"#,
                "field `sentences[0].raw`",
            ),
            (
                r#"{"images": [{"cocoid": 1, "filename": "x", "split": "test", "sentences": []}]}"#,
                "`sentences` is empty",
            ),
            (
                r#"{"images": [{"cocoid": "1", "filename": "x", "split": "test", "sentences": [{"raw": "a"}]}]}"#,
                "field `cocoid`",
            ),
        ];
        for (text, want) in cases {
            let d = ds(text);
            let err = d
                .split("test")
                .unwrap()
                .next()
                .unwrap()
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        let bad_split = r#"{"images": [{"cocoid": 1, "filename": "x", "split": 3, "sentences": [{"raw": "a"}]},
            {"cocoid": 2, "filename": "y", "split": "test", "sentences": [{"raw": "b"}]}]}"#;
        let items: Vec<_> = ds(bad_split).split("test").unwrap().collect();
        assert!(items[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("field `split`"));
        assert_eq!(items[1].as_ref().unwrap().id, 2);
        let err = CocoKarpathy::parse(
            r#"{"annotations": []}"#,
            Path::new("d.json"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`images`"), "{err}");
        assert!(CocoKarpathy::parse("{", Path::new("d.json"), Path::new(".")).is_err());
        assert!(
            CocoKarpathy::open(Path::new("/nonexistent/dataset_coco.json"), Path::new("."))
                .is_err()
        );
    }
}
