pub mod preprocess;
pub mod tokenizer;
