//! Reading a request: the body within its time and size limits, its fields (JSON or
//! multipart), the image within its decode budget, and the exit thresholds it asks for.
//! Every refusal names the field.

use super::{ApiError, Shared};
use crate::exit::MuePolicy;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use base64::Engine as _;
use image::DynamicImage;
use serde_json::{json, Value};

/// A parsed request body, before validation.
#[derive(Default)]
pub(super) struct Fields {
    pub image: Option<Vec<u8>>,
    pub hypothesis: Option<String>,
    pub premise: Option<String>,
    /// (field name, raw value) per stream: image, text, decoder.
    pub exits: [Option<Value>; 3],
}

pub(super) const EXIT_NAMES: [&str; 3] = ["image", "text", "decoder"];

/// Read the whole body within `body_timeout` and `max_body` bytes.
pub(super) async fn read_body(st: &Shared, body: Body) -> Result<Bytes, ApiError> {
    let limit = st.cfg.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body: larger than the limit of {limit} bytes (--max-body)"),
        )
    };
    match tokio::time::timeout(st.cfg.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "body: not received within {} ms",
                st.cfg.body_timeout.as_millis()
            ),
        )),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = src {
                if err.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                src = err.source();
            }
            Err(ApiError::bad(format!(
                "body: incomplete, the connection ended before the whole body arrived ({e})"
            )))
        }
    }
}

/// Base64 as people send it: line-wrapped (MIME) or as a `data:` URL.
fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let mut s = text.trim();
    if let Some(rest) = s.strip_prefix("data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err("image_base64: data URL without a comma".into());
        };
        if !meta.ends_with(";base64") {
            return Err(format!(
                "image_base64: data URL must be base64 (\"data:{meta},...\" is not)"
            ));
        }
        s = payload;
    }
    // A copy without the line breaks only when there are any.
    let clean: std::borrow::Cow<[u8]> = if s.bytes().any(|b| b.is_ascii_whitespace()) {
        s.bytes().filter(|b| !b.is_ascii_whitespace()).collect()
    } else {
        s.as_bytes().into()
    };
    base64::engine::general_purpose::STANDARD
        .decode(&clean)
        .map_err(|e| format!("image_base64: invalid base64 ({e})"))
}

const JSON_FIELDS: [&str; 4] = ["image_base64", "hypothesis", "premise", "exits"];
const MULTIPART_FIELDS: &str = "image, hypothesis, premise, exits.image, exits.text, exits.decoder";

pub(super) async fn read_fields(
    st: &Shared,
    parts: axum::http::request::Parts,
    body: Bytes,
) -> Result<Fields, ApiError> {
    let ctype = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut f = Fields::default();
    if ctype.starts_with("multipart/form-data") {
        let req = Request::from_parts(parts, Body::from(body));
        // The body is complete here: any error is in what the client sent.
        let mp_err = |e: axum::extract::multipart::MultipartError| {
            ApiError::bad(format!("multipart body: {}", e.body_text()))
        };
        let mut mp = Multipart::from_request(req, st)
            .await
            .map_err(|e| ApiError::bad(format!("multipart body: {}", e.body_text())))?;
        while let Some(field) = mp.next_field().await.map_err(mp_err)? {
            let name = field.name().unwrap_or("").to_string();
            let data = field.bytes().await.map_err(mp_err)?;
            let text = || {
                String::from_utf8(data.to_vec())
                    .map_err(|_| ApiError::bad(format!("{name}: not UTF-8 text")))
            };
            match name.as_str() {
                "image" => f.image = Some(data.to_vec()),
                "hypothesis" => f.hypothesis = Some(text()?),
                "premise" => f.premise = Some(text()?),
                other => {
                    let Some(i) = EXIT_NAMES
                        .iter()
                        .position(|s| other == format!("exits.{s}"))
                    else {
                        return Err(ApiError::bad(format!(
                            "{other:?}: unknown field (expected {MULTIPART_FIELDS})"
                        )));
                    };
                    let t = text()?;
                    let v = t.trim().parse::<f64>().map_err(|_| {
                        ApiError::bad(format!("{other} must be a number, got {t:?}"))
                    })?;
                    f.exits[i] = Some(json!(v));
                }
            }
        }
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("body is not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(ApiError::bad("body must be a JSON object"));
        };
        if let Some(k) = obj.keys().find(|k| !JSON_FIELDS.contains(&k.as_str())) {
            return Err(ApiError::bad(format!(
                "{k}: unknown field (expected {})",
                JSON_FIELDS.join(", ")
            )));
        }
        let string = |key: &str| -> Result<Option<String>, ApiError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(ApiError::bad(format!("{key} must be a string"))),
            }
        };
        if let Some(b64) = string("image_base64")? {
            f.image = Some(decode_base64(&b64).map_err(ApiError::bad)?);
        }
        f.hypothesis = string("hypothesis")?;
        f.premise = string("premise")?;
        match obj.get("exits") {
            None | Some(Value::Null) => {}
            Some(Value::Object(ex)) => {
                for (i, s) in EXIT_NAMES.iter().enumerate() {
                    f.exits[i] = ex.get(*s).cloned().filter(|v| !v.is_null());
                }
                if let Some(k) = ex.keys().find(|k| !EXIT_NAMES.contains(&k.as_str())) {
                    return Err(ApiError::bad(format!(
                        "exits.{k}: unknown field (expected image, text, decoder)"
                    )));
                }
            }
            Some(_) => return Err(ApiError::bad("exits must be an object")),
        }
    }
    Ok(f)
}

/// Decode an image within a memory budget; errors name the `image` field. The header's
/// dimensions, channels and bit depth are checked before any pixel is decoded:
/// `budget` bounds the decoded image plus the 8-bit RGB copy preprocessing makes.
pub fn decode_image(bytes: &[u8], max_side: u32, budget: usize) -> Result<DynamicImage, String> {
    use image::ImageDecoder;
    if bytes.is_empty() {
        return Err("image: empty".into());
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("image: cannot read ({e})"))?;
    if reader.format().is_none() {
        return Err("image: corrupt or unsupported format (PNG or JPEG expected)".into());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(budget as u64);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            format!("image: larger than the limit of {max_side}x{max_side} pixels")
        }
        e => format!("image: corrupt ({e})"),
    })?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err("image: zero size".into());
    }
    if w > max_side || h > max_side {
        return Err(format!(
            "image: {w}x{h} is larger than the limit of {max_side}x{max_side} pixels"
        ));
    }
    let ct = decoder.color_type();
    let pixels = w as u64 * h as u64;
    let need = pixels * (ct.bytes_per_pixel() as u64 + 3);
    if need > budget as u64 {
        let mib = |b: u64| b as f64 / 1048576.0;
        return Err(format!(
            "image: {w}x{h} with {} channels of {} bits needs {:.0} MiB to decode, over the \
             per-request decode budget of {:.0} MiB; send a smaller or 8-bit image",
            ct.channel_count(),
            ct.bits_per_pixel() / ct.channel_count() as u16,
            mib(need),
            mib(budget as u64)
        ));
    }
    let img = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::Limits(_) => format!(
            "image: over the per-request decode budget of {} MiB",
            budget >> 20
        ),
        e => format!("image: corrupt ({e})"),
    })?;
    Ok(img)
}

/// The model's input picture: 8-bit RGB resized to `size` x `size` exactly as the engine
/// does it (so the engine's own resize is then the identity). This, not the upload, is
/// what waits in the queue: `size * size * 3` bytes per request.
pub(super) fn preprocess(img: &DynamicImage, size: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(crate::data::preprocess::resize_bicubic_pil(
        &img.to_rgb8(),
        size,
        size,
    ))
}

/// Exit thresholds of a request over the task's defaults; each must be finite in [-2, 2].
pub(super) fn policy_of(raw: &[Option<Value>; 3], base: MuePolicy) -> Result<MuePolicy, ApiError> {
    let base_dec = base.decoder.tau();
    let mut vals = [base.image, base.text, base_dec];
    for (i, r) in raw.iter().enumerate() {
        let Some(v) = r else { continue };
        let name = EXIT_NAMES[i];
        let x = v
            .as_f64()
            .ok_or_else(|| ApiError::bad(format!("exits.{name} must be a number")))?;
        if !x.is_finite() || !(-2.0..=2.0).contains(&x) {
            return Err(ApiError::bad(format!(
                "exits.{name} must be a finite number in [-2, 2], got {x}"
            )));
        }
        vals[i] = x as f32;
    }
    if raw.iter().all(|r| r.is_none()) {
        return Ok(base);
    }
    let p = MuePolicy::new(vals[0], vals[1], vals[2]).map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(match (raw[2].is_none(), base.decoder) {
        (true, d) => MuePolicy { decoder: d, ..p },
        _ => p,
    })
}
