//! OFA-style TSV files: one example per line, tab separated, images as base64.
//!
//! * SNLI-VE: `uniq_id, image_id, image_base64, hypothesis, premise_caption, label`
//! * Caption: `uniq_id, image_id, caption, object_labels, image_base64`, where the
//!   caption field may hold several references joined by `&&` (OFA's valid/test files).
//!
//! Readers stream (`BufRead`, one line at a time) and report malformed rows with the
//! 1-based line number and the offending field.

use std::io::{BufRead, Write};

use base64::Engine;
use image::{ImageFormat, ImageReader, Limits, RgbImage};

use super::label::Label;

/// Limits applied when decoding an embedded image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Maximum length of the base64 text, checked before decoding.
    pub max_base64_len: usize,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_width: 4096,
            max_height: 4096,
            max_base64_len: 32 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageDecodeError {
    #[error("base64 text is {len} bytes, above the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    #[error("invalid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("cannot decode image: {0}")]
    Image(#[from] image::ImageError),
    #[error("cannot read image: {0}")]
    Io(#[from] std::io::Error),
}

/// Decodes base64-encoded image bytes (PNG, JPEG, ...) into an RGB image, refusing
/// oversized input before decoding and oversized images during decoding.
pub fn decode_base64_image(b64: &str, limits: &ImageLimits) -> Result<RgbImage, ImageDecodeError> {
    let b64 = b64.trim();
    if b64.len() > limits.max_base64_len {
        return Err(ImageDecodeError::TooLong {
            len: b64.len(),
            limit: limits.max_base64_len,
        });
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
    decode_image_bytes(&bytes, limits)
}

/// Decodes raw image bytes with size limits.
pub fn decode_image_bytes(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<RgbImage, ImageDecodeError> {
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_width);
    l.max_image_height = Some(limits.max_height);
    // RGBA8 at the maximum size, plus decoder slack.
    l.max_alloc = Some(limits.max_width as u64 * limits.max_height as u64 * 4 + (64 << 20));
    reader.limits(l);
    Ok(reader.decode()?.into_rgb8())
}

/// Encodes an RGB image as base64 PNG (deterministic).
pub fn encode_png_base64(img: &RgbImage) -> Result<String, image::ImageError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, ImageFormat::Png)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf.into_inner()))
}

#[derive(Debug, thiserror::Error)]
pub enum TsvError {
    #[error("line {line}: I/O error: {source}")]
    Io {
        line: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: expected {expected} tab-separated columns, found {found}")]
    ColumnCount {
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error("line {line}: field `{field}`: {message}")]
    Field {
        line: usize,
        field: &'static str,
        message: String,
    },
}

impl TsvError {
    pub fn line(&self) -> usize {
        match self {
            TsvError::Io { line, .. }
            | TsvError::ColumnCount { line, .. }
            | TsvError::Field { line, .. } => *line,
        }
    }
}

/// One SNLI-VE example.
#[derive(Clone, Debug, PartialEq)]
pub struct VeRow {
    pub id: String,
    pub image_id: String,
    pub image: RgbImage,
    pub hypothesis: String,
    pub premise: String,
    pub label: Label,
}

/// One captioning example (one or several reference captions).
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionRow {
    pub id: String,
    pub image_id: String,
    pub captions: Vec<String>,
    pub object_labels: String,
    pub image: RgbImage,
}

/// Reads lines, skipping blank ones, keeping a 1-based line counter.
struct LineSource<R> {
    reader: R,
    line_no: usize,
    buf: String,
}

impl<R: BufRead> LineSource<R> {
    fn new(reader: R) -> Self {
        LineSource {
            reader,
            line_no: 0,
            buf: String::new(),
        }
    }
    /// Next non-blank line, without its line terminator.
    fn next_line(&mut self) -> Option<Result<(usize, &str), TsvError>> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            match self.reader.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {
                    let t = self.buf.trim_end_matches(['\n', '\r']);
                    if t.trim().is_empty() {
                        continue;
                    }
                    let len = t.len();
                    return Some(Ok((self.line_no, &self.buf[..len])));
                }
                Err(e) => {
                    return Some(Err(TsvError::Io {
                        line: self.line_no,
                        source: e,
                    }))
                }
            }
        }
    }
}

fn split_cols(line_no: usize, line: &str, expected: usize) -> Result<Vec<&str>, TsvError> {
    let cols: Vec<&str> = line.split('\t').collect();
    if cols.len() != expected {
        return Err(TsvError::ColumnCount {
            line: line_no,
            expected,
            found: cols.len(),
        });
    }
    Ok(cols)
}

fn field_err(line: usize, field: &'static str, message: impl ToString) -> TsvError {
    TsvError::Field {
        line,
        field,
        message: message.to_string(),
    }
}

fn non_empty(line: usize, field: &'static str, v: &str) -> Result<String, TsvError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(field_err(line, field, "empty"));
    }
    Ok(v.to_string())
}

/// Streaming reader of SNLI-VE TSV rows.
pub struct VeReader<R> {
    src: LineSource<R>,
    limits: ImageLimits,
}

impl<R: BufRead> VeReader<R> {
    pub fn new(reader: R) -> Self {
        Self::with_limits(reader, ImageLimits::default())
    }
    pub fn with_limits(reader: R, limits: ImageLimits) -> Self {
        VeReader {
            src: LineSource::new(reader),
            limits,
        }
    }
}

impl<R: BufRead> Iterator for VeReader<R> {
    type Item = Result<VeRow, TsvError>;
    fn next(&mut self) -> Option<Self::Item> {
        let limits = self.limits.clone();
        let (line_no, line) = match self.src.next_line()? {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        Some(parse_ve_line(line_no, line, &limits))
    }
}

fn parse_ve_line(n: usize, line: &str, limits: &ImageLimits) -> Result<VeRow, TsvError> {
    let c = split_cols(n, line, 6)?;
    let id = non_empty(n, "uniq_id", c[0])?;
    let image_id = non_empty(n, "image_id", c[1])?;
    let image = decode_base64_image(c[2], limits).map_err(|e| field_err(n, "image_base64", e))?;
    let hypothesis = non_empty(n, "hypothesis", c[3])?;
    let premise = c[4].trim().to_string();
    let label = Label::parse(c[5].trim()).ok_or_else(|| {
        field_err(
            n,
            "label",
            format!(
                "unknown label {:?} (expected entailment, neutral or contradiction)",
                c[5].trim()
            ),
        )
    })?;
    Ok(VeRow {
        id,
        image_id,
        image,
        hypothesis,
        premise,
        label,
    })
}

/// Streaming reader of caption TSV rows (references split on `&&`).
pub struct CaptionReader<R> {
    src: LineSource<R>,
    limits: ImageLimits,
}

impl<R: BufRead> CaptionReader<R> {
    pub fn new(reader: R) -> Self {
        Self::with_limits(reader, ImageLimits::default())
    }
    pub fn with_limits(reader: R, limits: ImageLimits) -> Self {
        CaptionReader {
            src: LineSource::new(reader),
            limits,
        }
    }
}

impl<R: BufRead> Iterator for CaptionReader<R> {
    type Item = Result<CaptionRow, TsvError>;
    fn next(&mut self) -> Option<Self::Item> {
        let limits = self.limits.clone();
        let (line_no, line) = match self.src.next_line()? {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        Some(parse_caption_line(line_no, line, &limits))
    }
}

fn parse_caption_line(n: usize, line: &str, limits: &ImageLimits) -> Result<CaptionRow, TsvError> {
    let c = split_cols(n, line, 5)?;
    let id = non_empty(n, "uniq_id", c[0])?;
    let image_id = non_empty(n, "image_id", c[1])?;
    let captions: Vec<String> = c[2].split("&&").map(|s| s.trim().to_string()).collect();
    if captions.iter().any(|s| s.is_empty()) {
        return Err(field_err(n, "caption", "empty caption"));
    }
    let image = decode_base64_image(c[4], limits).map_err(|e| field_err(n, "image_base64", e))?;
    Ok(CaptionRow {
        id,
        image_id,
        captions,
        object_labels: c[3].trim().to_string(),
        image,
    })
}

fn check_text(field: &str, v: &str) -> std::io::Result<()> {
    if v.contains(['\t', '\n', '\r']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{field} contains a tab or newline: {v:?}"),
        ));
    }
    Ok(())
}

/// Writes one SNLI-VE row (`image_b64` as produced by [`encode_png_base64`]).
pub fn write_ve_row<W: Write>(
    w: &mut W,
    id: &str,
    image_id: &str,
    image_b64: &str,
    hypothesis: &str,
    premise: &str,
    label: Label,
) -> std::io::Result<()> {
    for (f, v) in [
        ("uniq_id", id),
        ("image_id", image_id),
        ("image_base64", image_b64),
        ("hypothesis", hypothesis),
        ("premise", premise),
    ] {
        check_text(f, v)?;
    }
    writeln!(
        w,
        "{id}\t{image_id}\t{image_b64}\t{hypothesis}\t{premise}\t{}",
        label.as_str()
    )
}

/// Writes one caption row; several references are joined with `&&`.
pub fn write_caption_row<W: Write>(
    w: &mut W,
    id: &str,
    image_id: &str,
    captions: &[String],
    object_labels: &str,
    image_b64: &str,
) -> std::io::Result<()> {
    for c in captions {
        check_text("caption", c)?;
        if c.contains("&&") || c.trim().is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid caption {c:?}"),
            ));
        }
    }
    for (f, v) in [
        ("uniq_id", id),
        ("image_id", image_id),
        ("object_labels", object_labels),
        ("image_base64", image_b64),
    ] {
        check_text(f, v)?;
    }
    writeln!(
        w,
        "{id}\t{image_id}\t{}\t{object_labels}\t{image_b64}",
        captions.join("&&")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn tiny() -> RgbImage {
        RgbImage::from_fn(8, 6, |x, y| Rgb([x as u8 * 20, y as u8 * 30, 7]))
    }

    #[test]
    fn ve_round_trip() {
        let b64 = encode_png_base64(&tiny()).unwrap();
        let mut buf = Vec::new();
        write_ve_row(
            &mut buf,
            "1",
            "10",
            &b64,
            "there is a red circle",
            "a red circle",
            Label::Entailment,
        )
        .unwrap();
        buf.extend_from_slice(b"\n"); // blank lines are skipped
        write_ve_row(
            &mut buf,
            "2",
            "10",
            &b64,
            "there is a cross",
            "a red circle",
            Label::Neutral,
        )
        .unwrap();
        let rows: Vec<VeRow> = VeReader::new(&buf[..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "1");
        assert_eq!(rows[0].image_id, "10");
        assert_eq!(rows[0].image, tiny());
        assert_eq!(rows[0].hypothesis, "there is a red circle");
        assert_eq!(rows[0].premise, "a red circle");
        assert_eq!(rows[0].label, Label::Entailment);
        assert_eq!(rows[1].label, Label::Neutral);
    }

    #[test]
    fn caption_round_trip() {
        let b64 = encode_png_base64(&tiny()).unwrap();
        let caps = vec!["a red circle".to_string(), "one red shape".to_string()];
        let mut buf = Vec::new();
        write_caption_row(&mut buf, "5", "50", &caps, "red circle", &b64).unwrap();
        write_caption_row(&mut buf, "6", "51", &caps[..1], "", &b64).unwrap();
        let rows: Vec<CaptionRow> = CaptionReader::new(&buf[..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows[0].captions, caps);
        assert_eq!(rows[0].object_labels, "red circle");
        assert_eq!(rows[0].image, tiny());
        assert_eq!(rows[1].captions, vec!["a red circle".to_string()]);
        assert_eq!(rows[1].id, "6");
    }

    fn first_err<I: Iterator<Item = Result<T, TsvError>>, T: std::fmt::Debug>(mut it: I) -> String {
        loop {
            match it.next() {
                Some(Err(e)) => return e.to_string(),
                Some(Ok(_)) => continue,
                None => panic!("no error"),
            }
        }
    }

    #[test]
    fn malformed_rows_are_reported_with_line_and_field() {
        let b64 = encode_png_base64(&tiny()).unwrap();
        let good = format!("1\t2\t{b64}\thyp\tprem\tentailment\n");

        let s = format!("{good}1\t2\t{b64}\thyp\tentailment\n");
        assert_eq!(
            first_err(VeReader::new(s.as_bytes())),
            "line 2: expected 6 tab-separated columns, found 5"
        );

        let s = format!("{good}{good}1\t2\t{b64}\thyp\tprem\tyes\n");
        let e = first_err(VeReader::new(s.as_bytes()));
        assert!(
            e.starts_with("line 3: field `label`: unknown label \"yes\""),
            "{e}"
        );

        let s = "1\t2\t@@@not-base64@@@\thyp\tprem\tneutral\n";
        let e = first_err(VeReader::new(s.as_bytes()));
        assert!(
            e.starts_with("line 1: field `image_base64`: invalid base64"),
            "{e}"
        );

        // valid base64, but not an image
        let junk = base64::engine::general_purpose::STANDARD.encode(b"definitely not a png file");
        let s = format!("1\t2\t{junk}\thyp\tprem\tneutral\n");
        let e = first_err(VeReader::new(s.as_bytes()));
        assert!(
            e.starts_with("line 1: field `image_base64`: cannot decode image"),
            "{e}"
        );

        let s = format!("\n1\t2\t{b64}\t \tprem\tneutral\n");
        assert_eq!(
            first_err(VeReader::new(s.as_bytes())),
            "line 2: field `hypothesis`: empty"
        );

        let s = format!("1\t2\tcap\tobj\t{b64}\textra\n");
        assert_eq!(
            first_err(CaptionReader::new(s.as_bytes())),
            "line 1: expected 5 tab-separated columns, found 6"
        );
        let s = format!("1\t2\ta cap&&\tobj\t{b64}\n");
        assert_eq!(
            first_err(CaptionReader::new(s.as_bytes())),
            "line 1: field `caption`: empty caption"
        );
        // the reader keeps going after an error
        let s = format!("1\t2\n{good}");
        let rows: Vec<_> = VeReader::new(s.as_bytes()).collect();
        assert!(rows[0].is_err() && rows[1].is_ok());
    }

    #[test]
    fn image_limits() {
        let big = RgbImage::new(300, 20);
        let b64 = encode_png_base64(&big).unwrap();
        let lim = ImageLimits {
            max_width: 256,
            max_height: 256,
            max_base64_len: 1 << 20,
        };
        let e = decode_base64_image(&b64, &lim).unwrap_err();
        assert!(matches!(e, ImageDecodeError::Image(_)), "{e}");
        let lim2 = ImageLimits {
            max_base64_len: 10,
            ..ImageLimits::default()
        };
        let e = decode_base64_image(&b64, &lim2).unwrap_err();
        assert!(matches!(e, ImageDecodeError::TooLong { .. }), "{e}");
        assert_eq!(
            decode_base64_image(&b64, &ImageLimits::default()).unwrap(),
            big
        );
        assert!(write_ve_row(&mut Vec::new(), "1", "2", &b64, "a\tb", "", Label::Neutral).is_err());
    }
}
