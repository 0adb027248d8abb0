//! Procedural scenes: a grid world of coloured shapes, rendered to RGB images.
//!
//! A scene lives on a `GRID x GRID` grid of cells. Every object occupies exactly
//! one cell (its centre is jittered inside the cell, but never across a cell
//! boundary), so spatial relations are defined on cell coordinates and are never
//! ambiguous. An optional *occluder* (a hatched box) covers a rectangle of cells;
//! nothing drawn there is visible, which is the source of neutral labels in the
//! visual-entailment task (see `benchmark/` and `docs/benchmark.md`).

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Number of grid cells per side (benchmark v1; v2 scenes carry their own `grid`).
pub const GRID: u32 = 4;

fn default_grid() -> u32 {
    GRID
}

fn is_default_grid(g: &u32) -> bool {
    *g == GRID
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
    Diamond,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Cross,
        Shape::Diamond,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
            Shape::Diamond => "diamond",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Cross => "crosses",
            Shape::Diamond => "diamonds",
        }
    }
    /// Is the offset `(dx, dy)` (in units of the object radius) inside the shape?
    fn contains(self, dx: f32, dy: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= 1.0,
            Shape::Square => dx.abs() <= 0.82 && dy.abs() <= 0.82,
            Shape::Triangle => {
                // apex at the top (dy = -1), flat base at dy = 0.8
                if !(-1.0..=0.8).contains(&dy) {
                    return false;
                }
                dx.abs() <= (dy + 1.0) / 1.8
            }
            Shape::Cross => {
                (dx.abs() <= 0.34 && dy.abs() <= 1.0) || (dy.abs() <= 0.34 && dx.abs() <= 1.0)
            }
            Shape::Diamond => dx.abs() + dy.abs() <= 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
}

impl Color {
    pub const ALL: [Color; 7] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
        Color::White,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::White => "white",
        }
    }
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 30, 30],
            Color::Green => [30, 190, 50],
            Color::Blue => [40, 80, 235],
            Color::Yellow => [240, 225, 30],
            Color::Purple => [150, 40, 190],
            Color::Orange => [250, 140, 10],
            Color::White => [245, 245, 245],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
    /// Radius as a fraction of the cell size.
    pub fn radius_frac(self) -> f32 {
        match self {
            Size::Small => 0.30,
            Size::Large => 0.45,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BgColor {
    Gray,
    Black,
    Brown,
}

impl BgColor {
    pub const ALL: [BgColor; 3] = [BgColor::Gray, BgColor::Black, BgColor::Brown];
    pub fn name(self) -> &'static str {
        match self {
            BgColor::Gray => "gray",
            BgColor::Black => "black",
            BgColor::Brown => "brown",
        }
    }
    pub fn rgb(self) -> [u8; 3] {
        match self {
            BgColor::Gray => [115, 115, 115],
            BgColor::Black => [22, 22, 26],
            BgColor::Brown => [90, 60, 40],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Texture {
    Plain,
    Striped,
    Checkered,
}

impl Texture {
    pub fn name(self) -> Option<&'static str> {
        match self {
            Texture::Plain => None,
            Texture::Striped => Some("striped"),
            Texture::Checkered => Some("checkered"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Background {
    pub color: BgColor,
    pub texture: Texture,
}

/// A shape placed in one grid cell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    /// Grid cell `(col, row)`; relations are defined on these.
    pub cell: (u32, u32),
    /// Centre in pixels.
    pub center: (f32, f32),
    /// Radius in pixels.
    pub radius: f32,
    /// Bounding box `[x0, y0, x1, y1]` in pixels (inclusive-exclusive, clamped to the image).
    pub bbox: [u32; 4],
}

/// An opaque hatched box covering the cells `col0..col0+cols` x `row0..row0+rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occluder {
    pub col0: u32,
    pub row0: u32,
    pub cols: u32,
    pub rows: u32,
}

impl Occluder {
    pub fn cells(&self) -> Vec<(u32, u32)> {
        let mut v = Vec::new();
        for r in self.row0..self.row0 + self.rows {
            for c in self.col0..self.col0 + self.cols {
                v.push((c, r));
            }
        }
        v
    }
    pub fn covers(&self, cell: (u32, u32)) -> bool {
        cell.0 >= self.col0
            && cell.0 < self.col0 + self.cols
            && cell.1 >= self.row0
            && cell.1 < self.row0 + self.rows
    }
    /// How many objects could hide behind it (one per cell).
    pub fn capacity(&self) -> usize {
        (self.cols * self.rows) as usize
    }
}

/// A thin line that is not an object (never counted, never described).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distractor {
    pub from: (f32, f32),
    pub to: (f32, f32),
    pub rgb: [u8; 3],
}

impl Distractor {
    /// A dimmed line of 10-25% of the image side `s`, anywhere.
    pub fn random(rng: &mut impl Rng, s: f32) -> Distractor {
        let x0 = rng.random_range(0.0..s);
        let y0 = rng.random_range(0.0..s);
        let len = rng.random_range(0.1..0.25) * s;
        let ang: f32 = rng.random_range(0.0..std::f32::consts::PI);
        let c = Color::ALL[rng.random_range(0..Color::ALL.len())].rgb();
        // Dimmed so that lines read as clutter, not shapes.
        let rgb = [c[0] / 2 + 40, c[1] / 2 + 40, c[2] / 2 + 40];
        Distractor {
            from: (x0, y0),
            to: (x0 + len * ang.cos(), y0 + len * ang.sin()),
            rgb,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// Image side in pixels (square images).
    pub image_size: u32,
    /// Grid cells per side (left out of the JSON when it is v1's `GRID`).
    #[serde(default = "default_grid", skip_serializing_if = "is_default_grid")]
    pub grid: u32,
    /// Difficulty tier 0 (easy) ..= 2 (hard).
    pub tier: u8,
    pub background: Background,
    /// The visible objects.
    pub objects: Vec<Object>,
    pub occluder: Option<Occluder>,
    pub distractors: Vec<Distractor>,
    /// Amplitude of uniform per-pixel noise (0 = none).
    pub noise: u8,
    /// Seed used for the pixel noise.
    pub noise_seed: u64,
}

impl Scene {
    pub fn cell_size(&self) -> f32 {
        self.image_size as f32 / self.grid as f32
    }

    /// Builds an object in `cell` of v1's grid with a centre offset `jitter` (fraction of a cell).
    pub fn make_object(
        image_size: u32,
        shape: Shape,
        color: Color,
        size: Size,
        cell: (u32, u32),
        jitter: (f32, f32),
    ) -> Object {
        Scene::make_object_in(GRID, image_size, shape, color, size, cell, jitter)
    }

    /// Builds an object in `cell` of a `grid x grid` grid.
    pub fn make_object_in(
        grid: u32,
        image_size: u32,
        shape: Shape,
        color: Color,
        size: Size,
        cell: (u32, u32),
        jitter: (f32, f32),
    ) -> Object {
        let cs = image_size as f32 / grid as f32;
        let cx = (cell.0 as f32 + 0.5 + jitter.0) * cs;
        let cy = (cell.1 as f32 + 0.5 + jitter.1) * cs;
        let radius = size.radius_frac() * cs;
        let clamp = |v: f32| v.max(0.0).min(image_size as f32) as u32;
        let bbox = [
            clamp((cx - radius).floor()),
            clamp((cy - radius).floor()),
            clamp((cx + radius).ceil() + 1.0),
            clamp((cy + radius).ceil() + 1.0),
        ];
        Object {
            shape,
            color,
            size,
            cell,
            center: (cx, cy),
            radius,
            bbox,
        }
    }

    /// A hand-built scene (plain gray background, no noise), mostly for tests.
    pub fn simple(
        image_size: u32,
        objects: &[(Shape, Color, Size, (u32, u32))],
        occluder: Option<Occluder>,
    ) -> Scene {
        Scene {
            image_size,
            grid: GRID,
            tier: 0,
            background: Background {
                color: BgColor::Gray,
                texture: Texture::Plain,
            },
            objects: objects
                .iter()
                .map(|&(sh, co, si, cell)| {
                    Scene::make_object(image_size, sh, co, si, cell, (0.0, 0.0))
                })
                .collect(),
            occluder,
            distractors: Vec::new(),
            noise: 0,
            noise_seed: 0,
        }
    }

    /// Deterministically generates a scene of the given tier from `seed`.
    pub fn generate(seed: u64, tier: u8, image_size: u32) -> Scene {
        assert!(tier <= 2, "tier must be 0, 1 or 2");
        assert!(image_size >= 32, "image_size must be >= 32");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bg_color = BgColor::ALL[rng.random_range(0..BgColor::ALL.len())];
        let texture = match tier {
            0 => Texture::Plain,
            1 => {
                if rng.random_bool(0.5) {
                    Texture::Plain
                } else {
                    Texture::Striped
                }
            }
            _ => [Texture::Plain, Texture::Striped, Texture::Checkered][rng.random_range(0..3)],
        };
        // Free cells, in a deterministic order.
        let mut free: Vec<(u32, u32)> = (0..GRID)
            .flat_map(|r| (0..GRID).map(move |c| (c, r)))
            .collect();

        // Occluder in half of the scenes.
        let occluder = if rng.random_bool(0.5) {
            let (cols, rows) = match (tier, rng.random_range(0..4u32)) {
                (0, 0 | 1) => (1, 1),
                (0, _) => (2, 1),
                (_, 0) => (1, 1),
                (_, 1) => (2, 1),
                (_, 2) => (1, 2),
                _ => (2, 2),
            };
            let col0 = rng.random_range(0..=GRID - cols);
            let row0 = rng.random_range(0..=GRID - rows);
            let occ = Occluder {
                col0,
                row0,
                cols,
                rows,
            };
            free.retain(|&c| !occ.covers(c));
            Some(occ)
        } else {
            None
        };

        let n_objects = match tier {
            0 => 1,
            1 => rng.random_range(2..=3),
            _ => rng.random_range(4..=6),
        };
        // Kinds: repeat a kind to create counts > 1.
        let mut kinds: Vec<(Shape, Color, Size)> = Vec::new();
        while kinds.len() < n_objects {
            let shape = Shape::ALL[rng.random_range(0..Shape::ALL.len())];
            let color = Color::ALL[rng.random_range(0..Color::ALL.len())];
            let size = match tier {
                0 => Size::Large,
                1 => Size::ALL[rng.random_range(0..2)],
                _ => {
                    if rng.random_bool(0.8) {
                        Size::Small
                    } else {
                        Size::Large
                    }
                }
            };
            let remaining = n_objects - kinds.len();
            let max_rep = remaining.min(4);
            let rep = if tier == 0 || rng.random_bool(0.55) {
                1
            } else {
                rng.random_range(1..=max_rep)
            };
            for _ in 0..rep {
                kinds.push((shape, color, size));
            }
        }
        let jitter_max: f32 = match tier {
            0 => 0.05,
            1 => 0.08,
            _ => 0.15,
        };
        let mut objects = Vec::with_capacity(n_objects);
        for (shape, color, size) in kinds {
            let idx = rng.random_range(0..free.len());
            let cell = free.swap_remove(idx);
            let j = if size == Size::Large {
                jitter_max.min(0.05)
            } else {
                jitter_max
            };
            let jx = rng.random_range(-j..=j);
            let jy = rng.random_range(-j..=j);
            objects.push(Scene::make_object(
                image_size,
                shape,
                color,
                size,
                cell,
                (jx, jy),
            ));
        }
        // Keep a canonical reading order (row-major) so captions do not depend on
        // the order of placement.
        objects.sort_by_key(|o| (o.cell.1, o.cell.0));

        let s = image_size as f32;
        let distractors = if tier == 2 {
            (0..rng.random_range(2..=4))
                .map(|_| Distractor::random(&mut rng, s))
                .collect()
        } else {
            Vec::new()
        };
        let noise = match tier {
            0 => 0,
            1 => 8,
            _ => 24,
        };
        Scene {
            image_size,
            grid: GRID,
            tier,
            background: Background {
                color: bg_color,
                texture,
            },
            objects,
            occluder,
            distractors,
            noise,
            noise_seed: rng.random(),
        }
    }
}

fn put_blend(img: &mut RgbImage, x: i64, y: i64, rgb: [u8; 3], alpha: f32) {
    if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 {
        return;
    }
    let p = img.get_pixel_mut(x as u32, y as u32);
    for (k, &c) in rgb.iter().enumerate() {
        let v = p.0[k] as f32 * (1.0 - alpha) + c as f32 * alpha;
        p.0[k] = v.round().clamp(0.0, 255.0) as u8;
    }
}

/// Renders the scene to an RGB image of `image_size x image_size` pixels.
pub fn render(scene: &Scene) -> RgbImage {
    let n = scene.image_size;
    let cs = scene.cell_size();
    let base = scene.background.color.rgb();
    let mut img = RgbImage::from_fn(n, n, |x, y| {
        let shade: i32 = match scene.background.texture {
            Texture::Plain => 0,
            Texture::Striped => {
                if (x / 4) % 2 == 0 {
                    14
                } else {
                    -6
                }
            }
            Texture::Checkered => {
                if ((x / 6) + (y / 6)) % 2 == 0 {
                    14
                } else {
                    -6
                }
            }
        };
        Rgb(base.map(|c| (c as i32 + shade).clamp(0, 255) as u8))
    });

    // Distractor lines (under the objects).
    for d in &scene.distractors {
        let steps = ((d.to.0 - d.from.0).abs().max((d.to.1 - d.from.1).abs()) * 2.0).ceil() as i32;
        for i in 0..=steps.max(1) {
            let t = i as f32 / steps.max(1) as f32;
            let x = d.from.0 + t * (d.to.0 - d.from.0);
            let y = d.from.1 + t * (d.to.1 - d.from.1);
            put_blend(&mut img, x as i64, y as i64, d.rgb, 1.0);
        }
    }

    // Objects, 4x4 supersampled for anti-aliasing.
    const SS: u32 = 4;
    for o in &scene.objects {
        let rgb = o.color.rgb();
        for y in o.bbox[1]..o.bbox[3] {
            for x in o.bbox[0]..o.bbox[2] {
                let mut hits = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let px = x as f32 + (sx as f32 + 0.5) / SS as f32;
                        let py = y as f32 + (sy as f32 + 0.5) / SS as f32;
                        let dx = (px - o.center.0) / o.radius;
                        let dy = (py - o.center.1) / o.radius;
                        if o.shape.contains(dx, dy) {
                            hits += 1;
                        }
                    }
                }
                if hits > 0 {
                    let a = hits as f32 / (SS * SS) as f32;
                    put_blend(&mut img, x as i64, y as i64, rgb, a);
                }
            }
        }
    }

    // Occluder: opaque diagonal hatching with a dark border.
    if let Some(occ) = &scene.occluder {
        let x0 = (occ.col0 as f32 * cs).round() as u32;
        let y0 = (occ.row0 as f32 * cs).round() as u32;
        let x1 = (((occ.col0 + occ.cols) as f32) * cs).round() as u32;
        let y1 = (((occ.row0 + occ.rows) as f32) * cs).round() as u32;
        for y in y0..y1.min(n) {
            for x in x0..x1.min(n) {
                let border = x == x0 || y == y0 || x + 1 == x1 || y + 1 == y1;
                let c = if border {
                    [10, 10, 10]
                } else if ((x + y) / 3) % 2 == 0 {
                    [200, 200, 190]
                } else {
                    [70, 70, 80]
                };
                img.put_pixel(x, y, Rgb(c));
            }
        }
    }

    // Pixel noise.
    if scene.noise > 0 {
        let mut rng = ChaCha8Rng::seed_from_u64(scene.noise_seed);
        let a = scene.noise as i32;
        for p in img.pixels_mut() {
            for k in 0..3 {
                let d: i32 = rng.random_range(-a..=a);
                p.0[k] = (p.0[k] as i32 + d).clamp(0, 255) as u8;
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        for &size in &[64u32, 96] {
            for tier in 0..3u8 {
                let a = Scene::generate(42, tier, size);
                let b = Scene::generate(42, tier, size);
                assert_eq!(a, b);
                let ia = render(&a);
                assert_eq!(ia.dimensions(), (size, size));
                assert_eq!(ia, render(&b));
            }
        }
        assert_ne!(Scene::generate(1, 2, 64), Scene::generate(2, 2, 64));
    }

    #[test]
    fn tiers_have_expected_object_counts_and_sizes() {
        for seed in 0..200u64 {
            for tier in 0..3u8 {
                let s = Scene::generate(seed, tier, 64);
                let n = s.objects.len();
                match tier {
                    0 => assert_eq!(n, 1),
                    1 => assert!((2..=3).contains(&n)),
                    _ => assert!((4..=6).contains(&n)),
                }
                let mut cells: Vec<_> = s.objects.iter().map(|o| o.cell).collect();
                cells.sort();
                cells.dedup();
                assert_eq!(cells.len(), n, "one object per cell");
                for o in &s.objects {
                    // at least ~8 px across at 64x64
                    assert!(o.radius * 2.0 >= 8.0, "object too small: {}", o.radius);
                    // centre stays inside its cell
                    let cs = s.cell_size();
                    assert_eq!((o.center.0 / cs) as u32, o.cell.0);
                    assert_eq!((o.center.1 / cs) as u32, o.cell.1);
                    if let Some(occ) = &s.occluder {
                        assert!(!occ.covers(o.cell));
                    }
                }
            }
        }
    }

    #[test]
    fn object_pixels_have_object_colour() {
        let s = Scene::simple(
            64,
            &[(Shape::Square, Color::Red, Size::Large, (1, 2))],
            None,
        );
        let img = render(&s);
        let o = &s.objects[0];
        let p = img.get_pixel(o.center.0 as u32, o.center.1 as u32);
        assert_eq!(p.0, Color::Red.rgb());
        // a corner of the image stays background
        assert_eq!(img.get_pixel(0, 0).0, BgColor::Gray.rgb());
    }
}
