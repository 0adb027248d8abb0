//! v2 scenes: an 8x8 grid (one 16 px patch per cell at 128 px, so 64 image tokens),
//! four difficulty levels from a single large shape to a dozen small ones in clutter.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::scene::{
    Background, BgColor, Color, Distractor, Occluder, Scene, Shape, Size, Texture,
};

/// Cells per side.
pub const GRID2: u32 = 8;
/// Scene levels 0 (trivial) ..= 3 (hard).
pub const LEVELS: u8 = 4;

/// What a scene level looks like.
struct Level {
    objects: (usize, usize),
    /// Probability that an object is large.
    large: f64,
    /// Probability that an object repeats the shape and colour of an earlier one
    /// (what makes counts above one).
    repeat: f64,
    textures: &'static [Texture],
    noise: u8,
    distractors: (usize, usize),
    jitter: f32,
}

const LEVEL: [Level; 4] = [
    Level {
        objects: (1, 2),
        large: 1.0,
        repeat: 0.0,
        textures: &[Texture::Plain],
        noise: 0,
        distractors: (0, 0),
        jitter: 0.05,
    },
    Level {
        objects: (3, 5),
        large: 0.5,
        repeat: 0.3,
        textures: &[Texture::Plain, Texture::Striped],
        noise: 4,
        distractors: (0, 1),
        jitter: 0.08,
    },
    Level {
        objects: (6, 8),
        large: 0.35,
        repeat: 0.45,
        textures: &[Texture::Plain, Texture::Striped, Texture::Checkered],
        noise: 8,
        distractors: (2, 4),
        jitter: 0.12,
    },
    Level {
        objects: (9, 12),
        large: 0.2,
        repeat: 0.55,
        textures: &[Texture::Striped, Texture::Checkered],
        noise: 12,
        distractors: (5, 8),
        jitter: 0.15,
    },
];

/// A random scene of `level` on the 8x8 grid. Half of the scenes (at every level) have an
/// occluder of one or two cells: what hides behind it is what makes a question neutral.
pub fn generate_scene(rng: &mut ChaCha8Rng, level: u8, image_size: u32) -> Scene {
    let lv = &LEVEL[level as usize];
    let background = Background {
        color: BgColor::ALL[rng.random_range(0..BgColor::ALL.len())],
        texture: lv.textures[rng.random_range(0..lv.textures.len())],
    };
    let mut free: Vec<(u32, u32)> = (0..GRID2)
        .flat_map(|r| (0..GRID2).map(move |c| (c, r)))
        .collect();
    let occluder = if rng.random_bool(0.5) {
        let (cols, rows) = [(1, 1), (2, 1), (1, 2)][rng.random_range(0..3)];
        let occ = Occluder {
            col0: rng.random_range(0..=GRID2 - cols),
            row0: rng.random_range(0..=GRID2 - rows),
            cols,
            rows,
        };
        free.retain(|&c| !occ.covers(c));
        Some(occ)
    } else {
        None
    };
    let n = rng.random_range(lv.objects.0..=lv.objects.1);
    let mut objects = Vec::with_capacity(n);
    for _ in 0..n {
        let (shape, color) = if !objects.is_empty() && rng.random_bool(lv.repeat) {
            let o: &crate::data::scene::Object = &objects[rng.random_range(0..objects.len())];
            (o.shape, o.color)
        } else {
            (
                Shape::ALL[rng.random_range(0..Shape::ALL.len())],
                Color::ALL[rng.random_range(0..Color::ALL.len())],
            )
        };
        let size = if rng.random_bool(lv.large) {
            Size::Large
        } else {
            Size::Small
        };
        let cell = free.swap_remove(rng.random_range(0..free.len()));
        let j = if size == Size::Large {
            lv.jitter.min(0.05)
        } else {
            lv.jitter
        };
        let jitter = (rng.random_range(-j..=j), rng.random_range(-j..=j));
        objects.push(Scene::make_object_in(
            GRID2, image_size, shape, color, size, cell, jitter,
        ));
    }
    objects.sort_by_key(|o| (o.cell.1, o.cell.0));
    let s = image_size as f32;
    let distractors = (0..rng.random_range(lv.distractors.0..=lv.distractors.1))
        .map(|_| Distractor::random(rng, s))
        .collect();
    Scene {
        image_size,
        grid: GRID2,
        tier: level,
        background,
        objects,
        occluder,
        distractors,
        noise: lv.noise,
        noise_seed: rng.random(),
    }
}
