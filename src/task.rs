//! The two tasks and what belongs to each: the MuE thresholds per task (`exits.json`), the
//! prompts OFA feeds the encoder, the entailment labels and their answers, and the text
//! clean-up OFA applies before tokenisation (SNLI-VE) and after decoding (captions).
//!
//! Pure text and settings: the token ids of the prompts are laid out in
//! [`crate::data::prompt`], on top of this.

use crate::exit::{DecoderThreshold, MuePolicy};
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The two tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Caption,
    Entail,
}

impl Task {
    pub const ALL: [Task; 2] = [Task::Caption, Task::Entail];

    /// The name on the command line and in file names.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Caption => "caption",
            Task::Entail => "entail",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| anyhow!("unknown task {s:?} (expected caption or entail)"))
    }
}

/// Per-task MuE thresholds, as `exits.json` in a model directory stores them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskThresholds {
    pub caption: MuePolicy,
    pub entail: MuePolicy,
}

impl Default for TaskThresholds {
    /// The paper's published settings: the image stream saturates early on entailment,
    /// the text prompt on captioning.
    fn default() -> Self {
        let c = |i: f32, t: f32, d: f32| MuePolicy {
            image: i,
            text: t,
            decoder: DecoderThreshold::Constant { tau: d },
        };
        TaskThresholds {
            caption: c(0.99, 0.7, 0.9),
            entail: c(0.7, 0.99, 0.9),
        }
    }
}

impl TaskThresholds {
    /// `exits.json` of the model directory if present, else the paper's settings.
    pub fn for_model(dir: &Path) -> Result<Self> {
        let path = dir.join("exits.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid thresholds file", path.display()))
    }

    pub fn get(&self, task: Task) -> MuePolicy {
        match task {
            Task::Caption => self.caption,
            Task::Entail => self.entail,
        }
    }
}

/// Prompt OFA feeds the encoder for image captioning.
pub const CAPTION_PROMPT: &str = " what does the image describe?";
/// Decoder answers for SNLI-VE, indexed by [`Label::index`]: the order in which the
/// candidates are scored.
pub const VE_ANSWERS: [&str; 3] = [" yes", " no", " maybe"];
/// Default word limit used by OFA for SNLI-VE text (`max_src_length`).
pub const VE_MAX_WORDS: usize = 80;
/// Longest accepted prompt text, in characters (checked before tokenization).
pub const MAX_TEXT_CHARS: usize = 4096;

/// SNLI-VE label and its OFA answer. Declared in the order of [`VE_ANSWERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Label {
    /// " yes"
    Entailment,
    /// " no"
    Contradiction,
    /// " maybe"
    Neutral,
}

impl Label {
    /// Every label, in the order of [`VE_ANSWERS`].
    pub const ALL: [Label; 3] = [Label::Entailment, Label::Contradiction, Label::Neutral];

    /// Index into [`VE_ANSWERS`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Inverse of [`Label::index`].
    pub fn from_index(i: usize) -> Option<Self> {
        Self::ALL.get(i).copied()
    }

    /// Decoder answer text (with its leading space), e.g. `" yes"`.
    pub fn answer(self) -> &'static str {
        VE_ANSWERS[self.index()]
    }

    /// Label for an answer text; accepts `" yes"`, `"yes"`, `" Yes "`, ...
    pub fn from_answer(answer: &str) -> Option<Self> {
        let a = answer.trim().to_lowercase();
        Self::ALL
            .into_iter()
            .find(|l| l.answer().trim() == a.as_str())
    }

    /// Dataset label name: "entailment", "contradiction" or "neutral".
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Entailment => "entailment",
            Label::Contradiction => "contradiction",
            Label::Neutral => "neutral",
        }
    }

    /// The label of a dataset name, exactly as written (see [`Label::as_str`]).
    pub fn parse(s: &str) -> Option<Label> {
        Self::ALL.into_iter().find(|l| l.as_str() == s)
    }

    /// The label of a hypothesis from whether the image allows it to be true and to be
    /// false: entailment if it must be true, contradiction if it cannot be, else neutral.
    pub fn from_possible(can_be_true: bool, can_be_false: bool) -> Label {
        match (can_be_true, can_be_false) {
            (true, false) => Label::Entailment,
            (true, true) => Label::Neutral,
            _ => Label::Contradiction,
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Label {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_lowercase();
        Label::parse(&s).ok_or_else(|| {
            anyhow!("unknown SNLI-VE label {s:?} (expected entailment, contradiction or neutral)")
        })
    }
}

/// Why a prompt text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("hypothesis is empty")]
    EmptyHypothesis,
    #[error("text is too long: more than {MAX_TEXT_CHARS} characters")]
    TooLong,
}

/// `text` if it is at most [`MAX_TEXT_CHARS`] characters long.
pub fn check_chars(text: &str) -> Result<&str, PromptError> {
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(PromptError::TooLong);
    }
    Ok(text)
}

/// The entailment prompt text OFA feeds the encoder: hypothesis (and premise) normalised
/// and cut to [`VE_MAX_WORDS`] words, then checked against [`MAX_TEXT_CHARS`].
pub fn entail_text(hypothesis: &str, premise: Option<&str>) -> Result<String, PromptError> {
    let hyp = ofa_ve_normalize(hypothesis, VE_MAX_WORDS);
    if hyp.trim().is_empty() {
        return Err(PromptError::EmptyHypothesis);
    }
    let prem = premise.map(|p| ofa_ve_normalize(p, VE_MAX_WORDS));
    let text = ve_prompt(&hyp, prem.as_deref());
    check_chars(&text)?;
    Ok(text)
}

/// SNLI-VE encoder prompt. `hypothesis` and `premise` should already be
/// normalised with [`ofa_ve_normalize`].
pub fn ve_prompt(hypothesis: &str, premise: Option<&str>) -> String {
    match premise {
        None => format!(" does the image describe \" {hypothesis} \"?"),
        Some(p) => format!(" can image and text1 \" {p} \" imply text2 \" {hypothesis} \"?"),
    }
}

/// OFA's `pre_caption` as used for SNLI-VE hypotheses and premises:
/// lower-case, strip *leading* `,.!?*#:;~`, turn `-` and `/` into spaces,
/// `<person>` into `person`, collapse runs of 2+ whitespace characters into
/// one space, drop a trailing newline, trim spaces, and keep at most
/// `max_words` space-separated words (OFA uses 80).
pub fn ofa_ve_normalize(text: &str, max_words: usize) -> String {
    let lowered = text.to_lowercase();
    let stripped = lowered.trim_start_matches([',', '.', '!', '?', '*', '#', ':', ';', '~']);
    let replaced = stripped
        .replace(['-', '/'], " ")
        .replace("<person>", "person");

    // Runs of two or more whitespace characters become a single space; a lone
    // whitespace character (even a tab or newline) is kept as is.
    let mut collapsed = String::with_capacity(replaced.len());
    let mut chars = replaced.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() && chars.peek().is_some_and(|n| n.is_whitespace()) {
            while chars.peek().is_some_and(|n| n.is_whitespace()) {
                chars.next();
            }
            collapsed.push(' ');
        } else {
            collapsed.push(c);
        }
    }

    let trimmed = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = trimmed.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        trimmed.to_string()
    }
}

/// OFA caption evaluation post-processing: delete every ASCII punctuation
/// character (Python's `string.punctuation`) and trim surrounding whitespace.
pub fn ofa_caption_postprocess(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_round_trip() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
            assert_eq!(t.to_string(), t.name());
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.name()));
        }
        let e = "captions".parse::<Task>().unwrap_err();
        assert!(e.to_string().contains("expected caption or entail"), "{e}");
    }

    #[test]
    fn thresholds_default_and_file() {
        let d = TaskThresholds::default();
        assert_eq!((d.entail.image, d.entail.text), (0.7, 0.99));
        assert_eq!((d.caption.image, d.caption.text), (0.99, 0.7));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TaskThresholds::for_model(dir.path()).unwrap(), d);
        std::fs::write(dir.path().join("exits.json"), "{\"caption\": 3}").unwrap();
        let e = TaskThresholds::for_model(dir.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("not a valid thresholds file"),
            "{e:#}"
        );
    }

    #[test]
    fn ve_normalize_cases() {
        assert_eq!(
            ofa_ve_normalize("A Man is riding a Horse.", 80),
            "a man is riding a horse."
        );
        // Leading punctuation stripped, trailing kept (OFA uses lstrip only).
        assert_eq!(ofa_ve_normalize(",.!?*#:;~Two dogs!", 80), "two dogs!");
        assert_eq!(
            ofa_ve_normalize("A well-dressed man/woman", 80),
            "a well dressed man woman"
        );
        assert_eq!(ofa_ve_normalize("  a   b \t\n c  \n", 80), "a b c");
        assert_eq!(ofa_ve_normalize("a <person> waves", 80), "a person waves");
        // A trailing single newline is dropped; a single inner tab survives.
        assert_eq!(ofa_ve_normalize("a\tb\n", 80), "a\tb");
        assert_eq!(ofa_ve_normalize("one two three four", 2), "one two");
        assert_eq!(ofa_ve_normalize("one two", 2), "one two");
        assert_eq!(ofa_ve_normalize("", 80), "");
        assert_eq!(ofa_ve_normalize("...", 80), "");
        assert_eq!(ofa_ve_normalize("ÉCOLE", 80), "école");
        let long: String = (0..100).map(|i| format!("w{i} ")).collect();
        let out = ofa_ve_normalize(&long, VE_MAX_WORDS);
        assert_eq!(out.split(' ').count(), 80);
        assert!(out.ends_with("w79"));
    }

    #[test]
    fn caption_postprocess_cases() {
        assert_eq!(
            ofa_caption_postprocess(" a man riding a horse."),
            "a man riding a horse"
        );
        assert_eq!(
            ofa_caption_postprocess(" a dog's ball, (red) & blue!? "),
            "a dogs ball red  blue"
        );
        assert_eq!(ofa_caption_postprocess("...!"), "");
    }

    #[test]
    fn prompts_and_labels() {
        assert_eq!(
            ve_prompt("a man rides", None),
            " does the image describe \" a man rides \"?"
        );
        assert_eq!(
            ve_prompt("animals outside", Some("two dogs")),
            " can image and text1 \" two dogs \" imply text2 \" animals outside \"?"
        );
        assert_eq!(Label::Entailment.answer(), " yes");
        assert_eq!(Label::Contradiction.answer(), " no");
        assert_eq!(Label::Neutral.answer(), " maybe");
        for l in Label::ALL {
            assert_eq!(Label::from_index(l.index()), Some(l));
            assert_eq!(Label::from_answer(l.answer()), Some(l));
            assert_eq!(l.as_str().parse::<Label>().unwrap(), l);
            assert_eq!(Label::parse(l.as_str()), Some(l));
            assert_eq!(VE_ANSWERS[l.index()], l.answer());
        }
        assert_eq!(Label::from_index(3), None);
        assert_eq!(Label::from_answer("Yes"), Some(Label::Entailment));
        assert!("entail".parse::<Label>().is_err());
        // `parse` reads the dataset's names exactly; `FromStr` forgives case and spaces.
        assert_eq!(Label::parse("Neutral"), None);
        assert_eq!(" Neutral ".parse::<Label>().unwrap(), Label::Neutral);
        assert_eq!(Label::from_possible(true, false), Label::Entailment);
        assert_eq!(Label::from_possible(true, true), Label::Neutral);
        assert_eq!(Label::from_possible(false, true), Label::Contradiction);
    }

    #[test]
    fn entail_text_normalises_and_limits() {
        assert_eq!(
            entail_text("There is a Red circle.", None).unwrap(),
            " does the image describe \" there is a red circle. \"?"
        );
        assert_eq!(
            entail_text("Animals outside", Some("Two dogs")).unwrap(),
            " can image and text1 \" two dogs \" imply text2 \" animals outside \"?"
        );
        assert_eq!(entail_text("...", None), Err(PromptError::EmptyHypothesis));
        assert_eq!(entail_text("  ", None), Err(PromptError::EmptyHypothesis));
        assert_eq!(
            PromptError::EmptyHypothesis.to_string(),
            "hypothesis is empty"
        );
        // 80 words of 60 characters: within the word limit, over the character limit.
        let word = "x".repeat(60);
        let long = vec![word.as_str(); 80].join(" ");
        assert_eq!(entail_text(&long, None), Err(PromptError::TooLong));
        assert_eq!(
            PromptError::TooLong.to_string(),
            "text is too long: more than 4096 characters"
        );
    }
}
