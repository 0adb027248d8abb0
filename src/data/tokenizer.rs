//! Text side of OFA: GPT-2 byte-level BPE with BART-style special ids. The
//! prompts and text clean-up of each task are in [`crate::task`], their token
//! layout in [`crate::data::prompt`].
//!
//! Id layout (see `docs/ofa.md`, section 3):
//! `<s>` = 0, `<pad>` = 1, `</s>` = 2, `<unk>` = 3, then the BPE tokens,
//! then `<mask>`, `<code_0>..<code_8191>` and `<bin_0>..<bin_999>`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// Beginning-of-sequence id (`<s>`).
pub const BOS_ID: u32 = 0;
/// Padding id (`<pad>`).
pub const PAD_ID: u32 = 1;
/// End-of-sequence id (`</s>`).
pub const EOS_ID: u32 = 2;
/// Unknown-token id (`<unk>`).
pub const UNK_ID: u32 = 3;
/// The four BART-style special tokens, in id order 0..3.
pub const SPECIAL_TOKENS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];
/// Mask token appended after the BPE vocabulary.
pub const MASK_TOKEN: &str = "<mask>";
/// Number of `<code_i>` image-code tokens OFA appends.
pub const NUM_CODE_TOKENS: usize = 8192;
/// Number of `<bin_i>` location tokens OFA appends.
pub const NUM_BIN_TOKENS: usize = 1000;
/// Smallest vocabulary [`Tokenizer::train`] accepts: 4 specials + 256 byte symbols.
pub const MIN_TRAIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256;

/// Errors specific to the tokenizer. Functions return `anyhow::Result`, and
/// these can be recovered with `err.downcast_ref::<TokenizerError>()`.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("file not found: {}", .0.display())]
    NotFound(PathBuf),
    #[error("failed to read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt tokenizer file {}: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("invalid vocabulary: {0}")]
    InvalidVocab(String),
    #[error("text is empty")]
    EmptyText,
    #[error("text is too long: {len} tokens (including <s> and </s>) exceeds the limit of {limit} tokens")]
    TooLong { len: usize, limit: usize },
    #[error("unknown token id {0}")]
    UnknownId(u32),
}

/// Byte-level BPE tokenizer with BART/OFA special ids.
///
/// Cheap to clone (the underlying `tokenizers::Tokenizer` lives behind an
/// `Arc`) and `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

/// GPT-2 pre-tokenizer / decoder: byte-level, regex splitting, no prefix space.
fn byte_level() -> ByteLevel {
    ByteLevel::new(false, true, true)
}

fn backend_err(context: &str, e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{context}: {e}")
}

impl Tokenizer {
    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let tok = Self {
            inner: Arc::new(inner),
        };
        tok.check_specials()?;
        Ok(tok)
    }

    /// Every tokenizer must map `<s>`, `<pad>`, `</s>`, `<unk>` to 0..3.
    fn check_specials(&self) -> Result<()> {
        for (expected, token) in SPECIAL_TOKENS.iter().enumerate() {
            match self.inner.token_to_id(token) {
                Some(id) if id == expected as u32 => {}
                found => {
                    return Err(TokenizerError::InvalidVocab(format!(
                        "special token {token} must have id {expected}, found {found:?}"
                    ))
                    .into())
                }
            }
        }
        Ok(())
    }

    /// Trains a small GPT-2 style byte-level BPE on `texts`.
    ///
    /// The alphabet is the full 256-symbol byte alphabet (so any text can be
    /// encoded), specials take ids 0..3, and the result is deterministic: the
    /// same texts and `vocab_size` give the same `tokenizer.json` bytes.
    pub fn train(texts: impl Iterator<Item = String>, vocab_size: usize) -> Result<Self> {
        if vocab_size < MIN_TRAIN_VOCAB {
            anyhow::bail!(
                "vocab_size {vocab_size} is too small: a byte-level BPE needs at least \
                 {MIN_TRAIN_VOCAB} entries (4 specials + 256 byte symbols)"
            );
        }
        let texts: Vec<String> = texts.collect();
        if texts.iter().all(|t| t.trim().is_empty()) {
            anyhow::bail!("cannot train a tokenizer: no non-empty training text");
        }

        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let bpe_trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(0)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer: TrainerWrapper = bpe_trainer.into();

        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(byte_level()))
            .with_decoder(Some(byte_level()));
        inner
            .train(&mut trainer, texts.iter())
            .map_err(|e| backend_err("BPE training failed", e))?;
        Self::from_inner(inner)
    }

    /// Loads a `tokenizer.json` written by [`Tokenizer::save`] (or any
    /// compatible `tokenizers` file whose specials sit at ids 0..3).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Self::from_inner(inner).with_context(|| format!("loading {}", path.display()))
    }

    /// Writes the tokenizer as a (pretty-printed) `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_json()?)
            .with_context(|| format!("failed to write tokenizer to {}", path.display()))
    }

    /// The `tokenizer.json` content as a string (what [`Tokenizer::save`] writes).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| backend_err("failed to serialise tokenizer", e))
    }

    /// GPT-2 byte-level BPE from Hugging Face `vocab.json` + `merges.txt`.
    ///
    /// Ids are kept exactly as in `vocab.json` (which must hold the BART
    /// specials at 0..3 and use the contiguous ids 0..n-1). With
    /// `add_ofa_tokens`, `<mask>` (kept at its `vocab.json` id if present,
    /// else id n), then `<code_0>..<code_8191>` and `<bin_0>..<bin_999>` are
    /// appended right after it, matching OFA's dictionary.
    pub fn from_gpt2_files(
        vocab_json: &Path,
        merges_txt: &Path,
        add_ofa_tokens: bool,
    ) -> Result<Self> {
        for p in [vocab_json, merges_txt] {
            if !p.is_file() {
                return Err(TokenizerError::NotFound(p.to_path_buf()).into());
            }
        }
        let vocab_str = vocab_json
            .to_str()
            .ok_or_else(|| anyhow!("non UTF-8 path {}", vocab_json.display()))?;
        let merges_str = merges_txt
            .to_str()
            .ok_or_else(|| anyhow!("non UTF-8 path {}", merges_txt.display()))?;
        let (vocab, merges) =
            BPE::read_file(vocab_str, merges_str).map_err(|e| TokenizerError::Corrupt {
                path: vocab_json.to_path_buf(),
                message: format!("with merges {}: {e}", merges_txt.display()),
            })?;

        // Ids must be exactly 0..n-1 so that appended tokens land at n, n+1, ...
        let n = vocab.len();
        let mut seen = vec![false; n];
        for (token, &id) in vocab.iter() {
            let slot = seen.get_mut(id as usize).ok_or_else(|| {
                TokenizerError::InvalidVocab(format!(
                    "{}: token {token:?} has id {id}, outside 0..{n}",
                    vocab_json.display()
                ))
            })?;
            if *slot {
                return Err(TokenizerError::InvalidVocab(format!(
                    "{}: id {id} is used twice",
                    vocab_json.display()
                ))
                .into());
            }
            *slot = true;
        }
        let mask_in_vocab = vocab.get(MASK_TOKEN).copied();

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Corrupt {
                path: merges_txt.to_path_buf(),
                message: format!("merges do not fit {}: {e}", vocab_json.display()),
            })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(byte_level()))
            .with_decoder(Some(byte_level()));
        // Mark the specials (already in vocab.json) as special added tokens so
        // that they are never split by the BPE when they appear in text.
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| backend_err("failed to add special tokens", e))?;

        if add_ofa_tokens {
            inner
                .add_special_tokens([AddedToken::from(MASK_TOKEN, true)])
                .map_err(|e| backend_err("failed to add <mask>", e))?;
            let extra: Vec<AddedToken> = (0..NUM_CODE_TOKENS)
                .map(|i| format!("<code_{i}>"))
                .chain((0..NUM_BIN_TOKENS).map(|i| format!("<bin_{i}>")))
                .map(|s| AddedToken::from(s, false))
                .collect();
            inner
                .add_tokens(extra)
                .map_err(|e| backend_err("failed to add OFA tokens", e))?;
        }

        let tok = Self::from_inner(inner)?;
        if add_ofa_tokens {
            tok.check_ofa_layout(n, mask_in_vocab)?;
        }
        Ok(tok)
    }

    fn check_ofa_layout(&self, base: usize, mask_in_vocab: Option<u32>) -> Result<()> {
        let expected_mask = mask_in_vocab.unwrap_or(base as u32);
        let mut expected = vec![(MASK_TOKEN.to_string(), expected_mask)];
        let mut next = expected_mask.max((base as u32).saturating_sub(1)) + 1;
        for i in 0..NUM_CODE_TOKENS {
            expected.push((format!("<code_{i}>"), next));
            next += 1;
        }
        for i in 0..NUM_BIN_TOKENS {
            expected.push((format!("<bin_{i}>"), next));
            next += 1;
        }
        for (token, id) in expected {
            let found = self.token_id(&token);
            if found != Some(id) {
                return Err(TokenizerError::InvalidVocab(format!(
                    "OFA token {token} expected at id {id}, found {found:?}"
                ))
                .into());
            }
        }
        Ok(())
    }

    /// BPE ids of `text`, without `<s>`/`</s>`. No prefix space is added.
    /// Errors with "text is empty" for empty or whitespace-only text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(TokenizerError::EmptyText.into());
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| backend_err("encoding failed", e))?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            return Err(TokenizerError::EmptyText.into());
        }
        Ok(ids)
    }

    /// Encoder input for OFA: `[0] + bpe(text) + [2]`.
    pub fn encode_with_bos_eos(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.push(BOS_ID);
        out.extend_from_slice(&ids);
        out.push(EOS_ID);
        Ok(out)
    }

    /// Like [`Tokenizer::encode_with_bos_eos`], but errors when the full
    /// sequence (including `<s>` and `</s>`) exceeds `max_tokens`.
    pub fn encode_limited(&self, text: &str, max_tokens: usize) -> Result<Vec<u32>> {
        let ids = self.encode_with_bos_eos(text)?;
        if ids.len() > max_tokens {
            return Err(TokenizerError::TooLong {
                len: ids.len(),
                limit: max_tokens,
            }
            .into());
        }
        Ok(ids)
    }

    /// Decodes ids to text, dropping the specials 0..3 (`<s>`, `<pad>`,
    /// `</s>`, `<unk>`). Errors on ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32> = ids.iter().copied().filter(|&id| id > UNK_ID).collect();
        if let Some(&bad) = kept
            .iter()
            .find(|&&id| self.inner.id_to_token(id).is_none())
        {
            return Err(TokenizerError::UnknownId(bad).into());
        }
        self.inner
            .decode(&kept, false)
            .map_err(|e| backend_err("decoding failed", e))
    }

    /// Total number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string (BPE symbol form, e.g. `"Ġthe"`, or an added token).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            TokenizerError::NotFound(path.to_path_buf()).into()
        } else {
            TokenizerError::Io {
                path: path.to_path_buf(),
                source: e,
            }
            .into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::CAPTION_PROMPT;
    use std::collections::BTreeMap;

    fn corpus() -> Vec<String> {
        let base = [
            " what does the image describe?",
            " does the image describe \" a man is riding a horse \"?",
            " can image and text1 \" two dogs play in the snow \" imply text2 \" animals are outside \"?",
            "a woman is sitting on a bench in the park.",
            "a group of people standing around a table with food.",
            "two children are playing with a ball on the beach!",
            "the cat is sleeping on the couch next to the window.",
            "a man rides his bike down the street, wearing a helmet.",
            " yes",
            " no",
            " maybe",
        ];
        // Repeat so that frequent pairs get merged.
        (0..5)
            .flat_map(|_| base.iter().map(|s| s.to_string()))
            .collect()
    }

    fn trained() -> Tokenizer {
        Tokenizer::train(corpus().into_iter(), 400).unwrap()
    }

    fn err_kind(e: &anyhow::Error) -> &TokenizerError {
        e.downcast_ref::<TokenizerError>()
            .unwrap_or_else(|| panic!("not a TokenizerError: {e:#}"))
    }

    #[test]
    fn tokenizer_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn trained_specials_at_0_to_3() {
        let tok = trained();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_id(s), Some(i as u32), "{s}");
            assert_eq!(tok.id_to_token(i as u32).as_deref(), Some(*s));
        }
        // The byte alphabet is complete and the vocabulary hit its target.
        assert_eq!(tok.vocab_size(), 400);
        assert!(tok.token_id("Ġ").is_some());
        assert!(
            tok.token_id("Ġthe").is_some(),
            "frequent word should be merged"
        );
    }

    #[test]
    fn trained_round_trip() {
        let tok = trained();
        for text in [
            CAPTION_PROMPT,
            " does the image describe \" a man is riding a horse \"?",
            "a woman is sitting on a bench",
            // Unseen words and non-ASCII bytes still round-trip (byte-level).
            "zebra crossing: naïve café ☕ 123",
            "  leading spaces and\ttabs\n",
        ] {
            let ids = tok.encode(text).unwrap();
            assert!(ids.iter().all(|&id| id > UNK_ID), "{text:?} -> {ids:?}");
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        // No prefix space: "a" and " a" encode differently.
        assert_ne!(tok.encode("a").unwrap(), tok.encode(" a").unwrap());
    }

    #[test]
    fn bos_eos_and_decode_skips_specials() {
        let tok = trained();
        let ids = tok.encode(CAPTION_PROMPT).unwrap();
        let full = tok.encode_with_bos_eos(CAPTION_PROMPT).unwrap();
        assert_eq!(full.len(), ids.len() + 2);
        assert_eq!(full[0], BOS_ID);
        assert_eq!(*full.last().unwrap(), EOS_ID);
        assert_eq!(&full[1..full.len() - 1], ids.as_slice());
        let mut with_pad = full.clone();
        with_pad.extend([PAD_ID, PAD_ID, UNK_ID]);
        assert_eq!(tok.decode(&with_pad).unwrap(), CAPTION_PROMPT);
        // Specials written in text are single tokens, not split by the BPE.
        assert_eq!(tok.encode("<s>").unwrap(), vec![BOS_ID]);
    }

    #[test]
    fn training_is_deterministic() {
        let a = Tokenizer::train(corpus().into_iter(), 350).unwrap();
        let b = Tokenizer::train(corpus().into_iter(), 350).unwrap();
        assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());

        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a.json"), dir.path().join("b.json"));
        a.save(&pa).unwrap();
        b.save(&pb).unwrap();
        assert_eq!(std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());

        // A different vocabulary size gives a different tokenizer.
        let c = Tokenizer::train(corpus().into_iter(), 300).unwrap();
        assert_ne!(a.to_json().unwrap(), c.to_json().unwrap());
    }

    #[test]
    fn save_load_round_trip() {
        let tok = trained();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        let text = " can image and text1 \" a dog \" imply text2 \" an animal \"?";
        assert_eq!(loaded.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(loaded.to_json().unwrap(), tok.to_json().unwrap());
    }

    #[test]
    fn from_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let e = Tokenizer::from_file(&missing).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::NotFound(p) if p == &missing));
        assert!(e.to_string().contains("not found"), "{e}");

        let corrupt = dir.path().join("corrupt.json");
        std::fs::write(&corrupt, "{ this is not json").unwrap();
        let e = Tokenizer::from_file(&corrupt).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::Corrupt { .. }));
        assert!(e.to_string().contains("corrupt tokenizer file"), "{e}");

        // Valid JSON, wrong shape.
        std::fs::write(&corrupt, "{\"model\": 5}").unwrap();
        let e = Tokenizer::from_file(&corrupt).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::Corrupt { .. }));
    }

    #[test]
    fn train_rejects_bad_input() {
        assert!(Tokenizer::train(corpus().into_iter(), 100).is_err());
        let e = Tokenizer::train(vec![String::new(), " ".into()].into_iter(), 300).unwrap_err();
        assert!(e.to_string().contains("no non-empty training text"), "{e}");
    }

    #[test]
    fn encode_errors() {
        let tok = trained();
        for empty in ["", "   ", "\n\t"] {
            let e = tok.encode(empty).unwrap_err();
            assert!(matches!(err_kind(&e), TokenizerError::EmptyText));
            assert_eq!(e.to_string(), "text is empty");
            assert!(tok.encode_with_bos_eos(empty).is_err());
            assert!(tok.encode_limited(empty, 100).is_err());
        }
        let text = " does the image describe \" a man is riding a horse \"?";
        let n = tok.encode_with_bos_eos(text).unwrap().len();
        assert_eq!(tok.encode_limited(text, n).unwrap().len(), n);
        let e = tok.encode_limited(text, n - 1).unwrap_err();
        assert!(matches!(
            err_kind(&e),
            TokenizerError::TooLong { len, limit } if *len == n && *limit == n - 1
        ));
        assert!(
            e.to_string()
                .contains(&format!("limit of {} tokens", n - 1)),
            "{e}"
        );

        let e = tok.decode(&[10, 1_000_000]).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::UnknownId(1_000_000)));
    }

    /// Writes a tiny GPT-2 style vocab.json / merges.txt with BART ids.
    fn write_tiny_gpt2(dir: &Path, with_mask: bool) -> (PathBuf, PathBuf) {
        let mut tokens = vec![
            "<s>", "<pad>", "</s>", "<unk>", ".", "Ġ", "a", "b", "c", "?", "Ġa", "ab", "Ġab", "Ġc",
            "Ġcab", "d",
        ];
        if with_mask {
            tokens.push("<mask>");
        }
        let vocab: BTreeMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, i as u32))
            .collect();
        let vp = dir.join("vocab.json");
        let mp = dir.join("merges.txt");
        std::fs::write(&vp, serde_json::to_string(&vocab).unwrap()).unwrap();
        std::fs::write(&mp, "#version: 0.2\nĠ a\na b\nĠa b\nĠ c\nĠc ab\n").unwrap();
        (vp, mp)
    }

    #[test]
    fn tiny_gpt2_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (vp, mp) = write_tiny_gpt2(dir.path(), false);
        let tok = Tokenizer::from_gpt2_files(&vp, &mp, false).unwrap();
        assert_eq!(tok.vocab_size(), 16);
        assert_eq!(tok.token_id("."), Some(4));
        assert_eq!(tok.encode(" ab.").unwrap(), vec![12, 4]);
        assert_eq!(tok.encode("ab c").unwrap(), vec![11, 13]);
        assert_eq!(tok.encode(" cab?").unwrap(), vec![14, 9]);
        assert_eq!(tok.encode("dab").unwrap(), vec![15, 11]);
        assert_eq!(tok.encode_with_bos_eos(" a").unwrap(), vec![0, 10, 2]);
        assert_eq!(tok.decode(&[0, 14, 12, 4, 2, 1]).unwrap(), " cab ab.");
        assert_eq!(tok.token_id("<mask>"), None);
        assert_eq!(tok.token_id("<code_0>"), None);
    }

    #[test]
    fn tiny_gpt2_ofa_tokens_appended() {
        let dir = tempfile::tempdir().unwrap();
        // vocab.json without <mask>: ids 0..15, so <mask> = 16.
        let (vp, mp) = write_tiny_gpt2(dir.path(), false);
        let tok = Tokenizer::from_gpt2_files(&vp, &mp, true).unwrap();
        let base = 16u32;
        assert_eq!(tok.token_id("<mask>"), Some(base));
        assert_eq!(tok.token_id("<code_0>"), Some(base + 1));
        assert_eq!(tok.token_id("<code_8191>"), Some(base + 8192));
        assert_eq!(tok.token_id("<bin_0>"), Some(base + 8193));
        assert_eq!(tok.token_id("<bin_999>"), Some(base + 9192));
        assert_eq!(tok.vocab_size(), base as usize + 9193);
        // BPE ids are unchanged and added tokens are matched inside text.
        assert_eq!(
            tok.encode(" ab<code_5><bin_7>.").unwrap(),
            vec![12, base + 6, base + 8193 + 7, 4]
        );
        assert_eq!(tok.decode(&[0, 12, base + 1, 2]).unwrap(), " ab<code_0>");

        // vocab.json that already has <mask> (BART style, last id): kept there.
        let dir2 = tempfile::tempdir().unwrap();
        let (vp, mp) = write_tiny_gpt2(dir2.path(), true);
        let tok = Tokenizer::from_gpt2_files(&vp, &mp, true).unwrap();
        assert_eq!(tok.token_id("<mask>"), Some(16));
        assert_eq!(tok.token_id("<code_0>"), Some(17));
        assert_eq!(tok.token_id("<bin_0>"), Some(17 + 8192));
        assert_eq!(tok.vocab_size(), 17 + 9192);
    }

    #[test]
    fn ofa_sized_vocab_ids() {
        // A BART-sized dictionary: ids 0..50263 (4 specials + 50260 entries).
        let dir = tempfile::tempdir().unwrap();
        let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            vocab.insert(s.to_string(), i as u32);
        }
        vocab.insert(".".into(), 4);
        let mut next = 5u32;
        for c in ByteLevel::alphabet() {
            if c != '.' {
                vocab.insert(c.to_string(), next);
                next += 1;
            }
        }
        let mut k = 0;
        while next < 50264 {
            vocab.insert(format!("Ġw{k}"), next);
            next += 1;
            k += 1;
        }
        let vp = dir.path().join("vocab.json");
        let mp = dir.path().join("merges.txt");
        std::fs::write(&vp, serde_json::to_string(&vocab).unwrap()).unwrap();
        std::fs::write(&mp, "#version: 0.2\n").unwrap();

        let tok = Tokenizer::from_gpt2_files(&vp, &mp, true).unwrap();
        assert_eq!(tok.token_id("<mask>"), Some(50264));
        assert_eq!(tok.token_id("<code_0>"), Some(50265));
        assert_eq!(tok.token_id("<bin_0>"), Some(58457));
        assert_eq!(tok.token_id("<bin_999>"), Some(59456));
        assert_eq!(tok.vocab_size(), 59457);
        assert_eq!(tok.token_id("."), Some(4));
    }

    #[test]
    fn gpt2_files_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (vp, mp) = write_tiny_gpt2(dir.path(), false);
        let missing = dir.path().join("missing.txt");
        let e = Tokenizer::from_gpt2_files(&vp, &missing, false).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::NotFound(p) if p == &missing));

        // Corrupt vocab.json.
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "[1, 2").unwrap();
        let e = Tokenizer::from_gpt2_files(&bad, &mp, false).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::Corrupt { .. }));

        // Merge referencing an unknown token.
        let bad_merges = dir.path().join("bad_merges.txt");
        std::fs::write(&bad_merges, "#version: 0.2\nx y\n").unwrap();
        let e = Tokenizer::from_gpt2_files(&vp, &bad_merges, false).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::Corrupt { .. }));

        // Specials not at 0..3.
        let swapped = dir.path().join("swapped.json");
        std::fs::write(&swapped, r#"{"<pad>":0,"<s>":1,"</s>":2,"<unk>":3,".":4}"#).unwrap();
        let empty_merges = dir.path().join("empty.txt");
        std::fs::write(&empty_merges, "#version: 0.2\n").unwrap();
        let e = Tokenizer::from_gpt2_files(&swapped, &empty_merges, false).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::InvalidVocab(_)));
        assert!(e.to_string().contains("<s> must have id 0"), "{e}");

        // Non-contiguous ids.
        let holes = dir.path().join("holes.json");
        std::fs::write(&holes, r#"{"<s>":0,"<pad>":1,"</s>":2,"<unk>":3,".":9}"#).unwrap();
        let e = Tokenizer::from_gpt2_files(&holes, &empty_merges, true).unwrap_err();
        assert!(matches!(err_kind(&e), TokenizerError::InvalidVocab(_)));
    }
}
