//! The visual-entailment label (a leaf module: the TSV reader/writer and the
//! benchmark generator both use it, neither depends on the other).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Label {
    Entailment,
    Neutral,
    Contradiction,
}

impl Label {
    pub const ALL: [Label; 3] = [Label::Entailment, Label::Neutral, Label::Contradiction];
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Entailment => "entailment",
            Label::Neutral => "neutral",
            Label::Contradiction => "contradiction",
        }
    }
    /// OFA's answer string for the label (with the leading space).
    pub fn answer(self) -> &'static str {
        match self {
            Label::Entailment => " yes",
            Label::Neutral => " maybe",
            Label::Contradiction => " no",
        }
    }
    pub fn parse(s: &str) -> Option<Label> {
        match s {
            "entailment" => Some(Label::Entailment),
            "neutral" => Some(Label::Neutral),
            "contradiction" => Some(Label::Contradiction),
            _ => None,
        }
    }
    /// Entailed if only true is possible, contradicted if only false, else neutral.
    pub(crate) fn from_possible(can_be_true: bool, can_be_false: bool) -> Label {
        match (can_be_true, can_be_false) {
            (true, false) => Label::Entailment,
            (true, true) => Label::Neutral,
            _ => Label::Contradiction,
        }
    }
}
