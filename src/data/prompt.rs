//! Token layout of the task prompts (OFA's): the encoder reads `[BOS] + bpe(prompt) +
//! [EOS]` within the model's length limit; entailment feeds the decoder `[BOS] + prompt`
//! and scores the answers after it. The one place inference and training build them.

use super::tokenizer::{Tokenizer, TokenizerError};
use crate::task::{check_chars, entail_text, PromptError, VE_ANSWERS};
use anyhow::Result;

/// Encoder ids of `text`: `[BOS] + bpe(text) + [EOS]`, refused when the text is over
/// [`crate::task::MAX_TEXT_CHARS`] characters or the ids over `max_tokens`.
pub fn encoder_ids(tok: &Tokenizer, text: &str, max_tokens: usize) -> Result<Vec<u32>> {
    check_chars(text)?;
    tok.encode_limited(text, max_tokens)
}

/// Encoder ids and decoder prefix (`[bos] + prompt`) of an entailment question.
pub fn entail_ids(
    tok: &Tokenizer,
    hypothesis: &str,
    premise: Option<&str>,
    max_tokens: usize,
    bos: u32,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let text = entail_text(hypothesis, premise)?;
    let ids = encoder_ids(tok, &text, max_tokens)?;
    let mut prefix = vec![bos];
    prefix.extend_from_slice(&ids[1..ids.len() - 1]);
    Ok((ids, prefix))
}

/// The ids of each answer in [`VE_ANSWERS`], in that order (the order they are scored).
pub fn answer_ids(tok: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    VE_ANSWERS.iter().map(|a| tok.encode(a)).collect()
}

/// Whether `e` refuses a prompt for its length (characters or tokens), rather than for
/// what it says: training skips such examples.
pub fn is_too_long(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref(), Some(PromptError::TooLong))
        || matches!(e.downcast_ref(), Some(TokenizerError::TooLong { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::{BOS_ID, EOS_ID};

    fn tok() -> Tokenizer {
        let texts = [
            " does the image describe \" a red circle \"?",
            " can image and text1 \" two dogs \" imply text2 \" animals \"?",
            " yes",
            " no",
            " maybe",
        ];
        Tokenizer::train(texts.iter().cycle().take(20).map(|s| s.to_string()), 300).unwrap()
    }

    #[test]
    fn entail_layout() {
        let tok = tok();
        let (ids, prefix) = entail_ids(&tok, "A Red circle", None, 64, 7).unwrap();
        let bpe = tok
            .encode(" does the image describe \" a red circle \"?")
            .unwrap();
        assert_eq!(ids[0], BOS_ID);
        assert_eq!(*ids.last().unwrap(), EOS_ID);
        assert_eq!(&ids[1..ids.len() - 1], bpe.as_slice());
        assert_eq!(prefix[0], 7);
        assert_eq!(&prefix[1..], bpe.as_slice());
        let answers = answer_ids(&tok).unwrap();
        assert_eq!(answers.len(), 3);
        assert_eq!(answers[1], tok.encode(" no").unwrap());
    }

    #[test]
    fn length_limits_are_errors_that_say_so() {
        let tok = tok();
        let n = entail_ids(&tok, "a red circle", None, 64, 0)
            .unwrap()
            .0
            .len();
        assert!(entail_ids(&tok, "a red circle", None, n, 0).is_ok());
        let e = entail_ids(&tok, "a red circle", None, n - 1, 0).unwrap_err();
        assert!(is_too_long(&e), "{e:#}");
        assert!(e.to_string().contains("text is too long"), "{e}");
        let long = vec!["y".repeat(60); 80].join(" ");
        let e = entail_ids(&tok, &long, None, usize::MAX, 0).unwrap_err();
        assert!(is_too_long(&e), "{e:#}");
        let e = entail_ids(&tok, "...", None, 64, 0).unwrap_err();
        assert!(!is_too_long(&e));
        assert_eq!(e.to_string(), "hypothesis is empty");
    }
}
