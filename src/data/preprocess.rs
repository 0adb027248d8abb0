//! OFA image preprocessing.
//!
//! OFA feeds images resized to a fixed square side `S` with Pillow's
//! antialiased bicubic filter (`Image.resize((S, S), Image.BICUBIC)`), scaled
//! to `[0, 1]` and normalised with mean 0.5 / std 0.5. Pillow resamples 8-bit
//! images in fixed point, so a float implementation differs by one 8-bit level
//! at some pixels; [`resize_bicubic_pil`] reproduces the fixed-point arithmetic
//! of Pillow's `libImaging/Resample.c` bit for bit.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

/// Largest accepted width or height of an input picture, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest accepted pixel count of an input picture (64 megapixels).
pub const MAX_IMAGE_PIXELS: u64 = 64_000_000;

/// Fractional bits of the fixed-point filter coefficients (Pillow keeps 8 bits
/// for the value and 2 bits of headroom in a 32-bit accumulator).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (Keys, a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-sample filter taps along one axis: first source index and the
/// fixed-point weights of the consecutive source samples it covers.
struct AxisTaps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Computes the taps for resampling `in_size` samples to `out_size` samples
/// over the whole axis, as Pillow does: the kernel support is widened by the
/// downscale factor, the weights are normalised to sum 1 in double precision
/// and then rounded half away from zero to `PRECISION_BITS` fixed point.
fn axis_taps(in_size: usize, out_size: usize) -> AxisTaps {
    const SUPPORT: f64 = 2.0;
    // Pillow computes the box edges as C floats; 0 and in_size are exact.
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let inv = 1.0 / filter_scale;
    let one = (1u64 << PRECISION_BITS) as f64;

    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        // C casts truncate toward zero; negative values are clamped to 0 anyway.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let hi = hi.max(lo);
        let raw: Vec<f64> = (lo..hi)
            .map(|i| bicubic((i as f64 - center + 0.5) * inv))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        start.push(lo);
        weights.push(fixed);
    }
    AxisTaps { start, weights }
}

/// Rounds a fixed-point accumulator (which already holds the +0.5 bias) to an
/// 8-bit value, clamping to 0..=255.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One 8-bit resampling pass along the rows (`horizontal`) or the columns of
/// `src` (`src_w` x `src_h` RGB): output sample `o` of the pass reads the
/// source samples `taps.start[o] - offset ..` of its line. Every output value
/// is rounded and clipped to 8 bits, as in Pillow.
fn resample_pass(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    taps: &AxisTaps,
    offset: usize,
    horizontal: bool,
) -> (Vec<u8>, usize, usize) {
    let bias: i32 = 1 << (PRECISION_BITS - 1);
    let n = taps.start.len();
    if horizontal {
        let mut out = vec![0u8; n * src_h * 3];
        for r in 0..src_h {
            let src_row = &src[r * src_w * 3..(r + 1) * src_w * 3];
            let dst_row = &mut out[r * n * 3..(r + 1) * n * 3];
            for (x, (&x0, k)) in taps.start.iter().zip(&taps.weights).enumerate() {
                let x0 = x0 - offset;
                let mut acc = [bias; 3];
                for (j, &kw) in k.iter().enumerate() {
                    let p = &src_row[(x0 + j) * 3..(x0 + j) * 3 + 3];
                    for c in 0..3 {
                        acc[c] = acc[c].wrapping_add((p[c] as i32).wrapping_mul(kw));
                    }
                }
                for c in 0..3 {
                    dst_row[x * 3 + c] = clip8(acc[c]);
                }
            }
        }
        (out, n, src_h)
    } else {
        let stride = src_w * 3;
        let mut out = vec![0u8; stride * n];
        for (y, (&y0, k)) in taps.start.iter().zip(&taps.weights).enumerate() {
            let base = y0 - offset;
            let dst_row = &mut out[y * stride..(y + 1) * stride];
            for (i, d) in dst_row.iter_mut().enumerate() {
                let mut acc = bias;
                for (j, &kw) in k.iter().enumerate() {
                    acc = acc.wrapping_add((src[(base + j) * stride + i] as i32).wrapping_mul(kw));
                }
                *d = clip8(acc);
            }
        }
        (out, src_w, n)
    }
}

/// Whether Pillow (13.0, `ImagingResampleInner`) runs the horizontal pass
/// first: it runs the vertical pass first when the height shrinks by more than
/// twice as many pixels as the width does (cheaper second pass). The order
/// changes the 8-bit result, since the intermediate image is rounded.
fn horizontal_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let dy = in_h as i64 - out_h as i64;
    let dx = in_w as i64 - out_w as i64;
    !(dy > 0 && dy > dx * 2)
}

/// Resizes an RGB image to exactly `w` x `h` with Pillow's antialiased bicubic
/// filter, reproducing Pillow's 8-bit fixed-point results exactly.
///
/// Like Pillow's `ImagingResampleInner`, the two passes run in the order
/// [`horizontal_first`] picks; when the horizontal pass is first it runs only
/// over the source rows the vertical pass needs. The intermediate image is
/// rounded to 8 bits between the passes, and a pass is skipped when its axis
/// keeps its size.
pub fn resize_bicubic_pil(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    resize_in_order(
        img,
        w,
        h,
        horizontal_first(in_w, in_h, w as usize, h as usize),
    )
}

/// [`resize_bicubic_pil`] with the order of the passes given.
fn resize_in_order(img: &RgbImage, w: u32, h: u32, h_first: bool) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (w as usize, h as usize);
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(w, h);
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let vert = axis_taps(in_h, out_h);
    let horiz = axis_taps(in_w, out_w);
    let src = img.as_raw();

    let out = if h_first {
        let (mid, mid_w, mid_h, row0) = if need_h {
            // Only the source rows the vertical pass reads.
            let row_first = vert.start[0];
            let row_last = vert.start[out_h - 1] + vert.weights[out_h - 1].len();
            let rows = &src[row_first * in_w * 3..row_last * in_w * 3];
            let (buf, bw, bh) = resample_pass(rows, in_w, row_last - row_first, &horiz, 0, true);
            (buf, bw, bh, row_first)
        } else {
            (src.to_vec(), in_w, in_h, 0)
        };
        if need_v {
            resample_pass(&mid, mid_w, mid_h, &vert, row0, false).0
        } else {
            mid
        }
    } else {
        // Vertical first: over the full width (Pillow crops nothing here).
        let (mid, mid_w, mid_h) = if need_v {
            resample_pass(src, in_w, in_h, &vert, 0, false)
        } else {
            (src.to_vec(), in_w, in_h)
        };
        if need_h {
            resample_pass(&mid, mid_w, mid_h, &horiz, 0, true).0
        } else {
            mid
        }
    };
    RgbImage::from_raw(w, h, out).expect("buffer size matches dimensions")
}

/// Converts 8-bit RGB pixels to an OFA input tensor `[3, H, W]` (f32, CHW),
/// `x / 255` normalised with mean 0.5 and std 0.5, i.e. values in `[-1, 1]`.
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            // Same float32 operations as torchvision: ToTensor (/255), then
            // Normalize ((x - 0.5) / 0.5).
            let x = px[c] as f32 / 255.0;
            data[c * plane + i] = (x - 0.5) / 0.5;
        }
    }
    Tensor::from_vec(data, (3, h, w), device)
}

/// Full OFA preprocessing of one picture: RGB, Pillow bicubic resize to
/// `size` x `size` (aspect ratio not kept), normalised CHW tensor `[3, S, S]`.
pub fn ofa_image_tensor(
    img: &DynamicImage,
    size: u32,
    device: &Device,
) -> candle_core::Result<Tensor> {
    if size == 0 {
        candle_core::bail!("image size must be positive");
    }
    let rgb = img.to_rgb8();
    let resized = resize_bicubic_pil(&rgb, size, size);
    rgb_to_tensor(&resized, device)
}

/// Checks picture dimensions against [`MAX_IMAGE_SIDE`] and
/// [`MAX_IMAGE_PIXELS`]; zero-sized pictures are rejected too.
pub fn check_dimensions(w: u32, h: u32) -> anyhow::Result<()> {
    if w == 0 || h == 0 {
        bail!("image has zero size ({w}x{h})");
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        bail!("image is {w}x{h}, a side exceeds the limit of {MAX_IMAGE_SIDE} px");
    }
    let pixels = w as u64 * h as u64;
    if pixels > MAX_IMAGE_PIXELS {
        bail!("image is {w}x{h} = {pixels} pixels, more than the limit of {MAX_IMAGE_PIXELS}");
    }
    Ok(())
}

/// Opens and decodes an image file (format guessed from its content) as 8-bit
/// RGB. Rejects pictures wider or taller than [`MAX_IMAGE_SIDE`] or with more
/// than [`MAX_IMAGE_PIXELS`] pixels before decoding them.
pub fn load_image(path: impl AsRef<Path>) -> anyhow::Result<RgbImage> {
    let path = path.as_ref();
    let reader = ImageReader::open(path)
        .with_context(|| format!("cannot open image file {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image file {}", path.display()))?;
    if reader.format().is_none() {
        bail!(
            "{}: unrecognised image format (PNG and JPEG are supported)",
            path.display()
        );
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .with_context(|| format!("{}: invalid or too large image", path.display()))?;
    let (w, h) = decoder.dimensions();
    check_dimensions(w, h).with_context(|| path.display().to_string())?;
    let img = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("{}: corrupt or truncated image data", path.display()))?;
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ofa-parity"
        ))
        .join(name)
    }

    fn pillow_fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pillow-resize"
        ))
        .join(name)
    }

    #[test]
    fn pass_order_follows_pillow() {
        // Height shrinks by more than twice the width's shrink: vertical first.
        assert!(!horizontal_first(375, 500, 480, 480));
        assert!(!horizontal_first(33, 517, 128, 128));
        assert!(!horizontal_first(120, 190, 160, 160));
        // Landscape, upscaling, squares and mild portrait shrinks: horizontal first.
        assert!(horizontal_first(500, 375, 480, 480));
        assert!(horizontal_first(375, 500, 128, 128));
        assert!(horizontal_first(150, 200, 384, 384));
        assert!(horizontal_first(64, 64, 128, 128));
        assert!(horizontal_first(200, 150, 200, 150));
    }

    /// Every case of the Pillow fixture (`tests/fixtures/pillow-resize`,
    /// `cases.json`): every 8-bit value equals Pillow's.
    #[test]
    fn pillow_resize_cases_match_exactly() {
        let text = std::fs::read_to_string(pillow_fixture("cases.json")).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = doc["cases"].as_array().expect("cases.json: `cases` list");
        assert!(!cases.is_empty());
        let mut failures = Vec::new();
        let mut vertical_first = 0;
        // Values that the other pass order would get wrong, over the vertical-first cases.
        let (mut order_cases, mut order_worst) = (0usize, 0i32);
        for case in cases {
            let src_name = case["source"].as_str().unwrap();
            let side = case["side"].as_u64().unwrap() as u32;
            let (w, h) = (
                case["width"].as_u64().unwrap() as u32,
                case["height"].as_u64().unwrap() as u32,
            );
            let src = load_image(pillow_fixture(src_name)).unwrap();
            assert_eq!(src.dimensions(), (w, h), "{src_name}");
            let want = load_image(pillow_fixture(case["expected"].as_str().unwrap())).unwrap();
            assert_eq!(want.dimensions(), (side, side));
            let got = resize_bicubic_pil(&src, side, side);
            if !horizontal_first(w as usize, h as usize, side as usize, side as usize) {
                vertical_first += 1;
                let other = resize_in_order(&src, side, side, true);
                let worst = (other.as_raw().iter().zip(want.as_raw()))
                    .map(|(a, b)| (*a as i32 - *b as i32).abs())
                    .max()
                    .unwrap_or(0);
                if worst > 0 {
                    order_cases += 1;
                    order_worst = order_worst.max(worst);
                }
            }
            let (mut differing, mut worst) = (0usize, 0i32);
            for (a, b) in got.as_raw().iter().zip(want.as_raw()) {
                let d = (*a as i32 - *b as i32).abs();
                if d != 0 {
                    differing += 1;
                    worst = worst.max(d);
                }
            }
            if differing != 0 {
                failures.push(format!(
                    "{w}x{h} -> {side}: {differing} values differ (worst {worst} levels)"
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases differ from Pillow:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        // The fixture exercises both pass orders, and the order matters: always running
        // the horizontal pass first misses Pillow on some vertical-first cases.
        eprintln!(
            "{} cases match; {vertical_first} run the vertical pass first, and horizontal-first \
             would differ on {order_cases} of them (worst {order_worst} levels)",
            cases.len()
        );
        assert!(vertical_first > 0 && vertical_first < cases.len());
        assert!(order_cases > 0);
    }

    #[test]
    fn bicubic_kernel_values() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert_eq!(bicubic(-0.5), bicubic(0.5));
        assert!((bicubic(0.5) - 0.5625).abs() < 1e-15);
        assert!((bicubic(1.5) + 0.0625).abs() < 1e-15);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(200, 128), (150, 128), (128, 480), (7, 3), (480, 480)] {
            let t = axis_taps(i, o);
            for (s, k) in t.start.iter().zip(&t.weights) {
                assert!(s + k.len() <= i);
                let sum: i64 = k.iter().map(|&v| v as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 255]));
        for (w, h) in [(16, 16), (64, 50), (37, 10), (5, 23)] {
            let out = resize_bicubic_pil(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [12, 200, 255]), "{w}x{h}");
        }
        // Same size: unchanged.
        let out = resize_bicubic_pil(&img, 37, 23);
        assert_eq!(out, img);
    }

    #[test]
    fn fixture_images_match_pillow_exactly() {
        let dev = Device::Cpu;
        let outputs = candle_core::safetensors::load(fixture("outputs.safetensors"), &dev).unwrap();
        let reference = &outputs["patch_images"];
        // Sizes come from the fixture: [images, 3, side, side].
        let (n, ch, side, side_w) = reference.dims4().unwrap();
        assert_eq!((ch, side_w), (3, side), "patch_images must be square RGB");
        assert!(n > 0);
        for i in 0..n {
            let rgb = load_image(fixture(&format!("image_{i}.png"))).unwrap();
            let resized = resize_bicubic_pil(&rgb, side as u32, side as u32);
            let expected: Vec<f32> = reference
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // Recover Pillow's 8-bit pixels from the normalised tensor (CHW).
            let plane = side * side;
            let mut differing = 0usize;
            let mut worst = 0i32;
            for (p, px) in resized.as_raw().chunks_exact(3).enumerate() {
                for c in 0..3 {
                    let want = ((expected[c * plane + p] * 0.5 + 0.5) * 255.0).round() as i32;
                    let d = (px[c] as i32 - want).abs();
                    if d != 0 {
                        differing += 1;
                        worst = worst.max(d);
                    }
                }
            }
            assert_eq!(
                differing, 0,
                "image_{i}: {differing} channel values differ from Pillow (worst {worst} levels)"
            );

            // The full pipeline reproduces the reference tensor bit for bit.
            let dynimg = DynamicImage::ImageRgb8(rgb);
            let t = ofa_image_tensor(&dynimg, side as u32, &dev).unwrap();
            assert_eq!(t.dims(), &[3, side, side]);
            let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                got.iter().zip(&expected).all(|(a, b)| a == b),
                "image_{i} tensor"
            );
        }
    }

    #[test]
    fn load_image_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.png");
        let err = load_image(&missing).unwrap_err();
        assert!(format!("{err:#}").contains("nope.png"), "{err:#}");

        let bytes = std::fs::read(fixture("image_0.png")).unwrap();
        let cut = dir.path().join("cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(load_image(&cut).is_err());

        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"definitely not an image").unwrap();
        assert!(load_image(&junk).is_err());

        // Too wide: a valid 9000x1 PNG is rejected by the side limit.
        let wide = dir.path().join("wide.png");
        RgbImage::new(9000, 1).save(&wide).unwrap();
        let err = load_image(&wide).unwrap_err();
        assert!(
            format!("{err:#}").to_lowercase().contains("limit"),
            "{err:#}"
        );
        assert!(check_dimensions(8192, 7812).is_ok());
        assert!(check_dimensions(8192, 7813).is_err());
        assert!(check_dimensions(8193, 1).is_err());
        assert!(check_dimensions(1, 8193).is_err());
        assert!(check_dimensions(0, 5).is_err());
        // Within limits it loads.
        let ok = dir.path().join("ok.png");
        RgbImage::new(8192, 1).save(&ok).unwrap();
        assert_eq!(load_image(&ok).unwrap().dimensions(), (8192, 1));
    }
}
