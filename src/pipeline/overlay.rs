//! Overlays designers see: depth as a perceptual colour map (turbo) over the image, saliency as a
//! translucent mask with its contour drawn.

use image::{GrayImage, Rgb, RgbImage};

/// Google's turbo colour map (polynomial fit by its authors), x in [0, 1].
pub fn turbo(x: f32) -> [u8; 3] {
    let x = x.clamp(0.0, 1.0) as f64;
    let r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))));
    let g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))));
    let b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))));
    let c = |v: f64| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    [c(r), c(g), c(b)]
}

/// The depth map in turbo colours (near = red, far = blue).
pub fn depth_colormap(depth: &GrayImage) -> RgbImage {
    RgbImage::from_fn(depth.width(), depth.height(), |x, y| Rgb(turbo(depth.get_pixel(x, y)[0] as f32 / 255.0)))
}

/// Colour-mapped depth blended over the image (35% image, 65% depth colours).
pub fn depth_overlay(image: &RgbImage, depth: &GrayImage) -> RgbImage {
    let depth = fit(depth, image.width(), image.height());
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let p = image.get_pixel(x, y);
        let d = turbo(depth.get_pixel(x, y)[0] as f32 / 255.0);
        Rgb([0, 1, 2].map(|c| (0.35 * p[c] as f32 + 0.65 * d[c] as f32).round() as u8))
    })
}

fn fit(map: &GrayImage, w: u32, h: u32) -> GrayImage {
    if map.dimensions() == (w, h) {
        map.clone()
    } else {
        image::imageops::resize(map, w, h, image::imageops::FilterType::Triangle)
    }
}

/// The image with the salient region tinted (opacity follows saliency) and the contour of
/// saliency >= 0.5 drawn in yellow.
pub fn saliency_overlay(image: &RgbImage, saliency: &GrayImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let s = fit(saliency, w, h);
    let on = |x: i64, y: i64| x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && s.get_pixel(x as u32, y as u32)[0] >= 128;
    RgbImage::from_fn(w, h, |x, y| {
        let (xi, yi) = (x as i64, y as i64);
        let inside = on(xi, yi);
        let edge = inside && [(-1, 0), (1, 0), (0, -1), (0, 1), (-2, 0), (2, 0), (0, -2), (0, 2)].iter().any(|(dx, dy)| !on(xi + dx, yi + dy));
        if edge {
            return Rgb([255, 230, 0]);
        }
        let p = image.get_pixel(x, y);
        let a = 0.5 * s.get_pixel(x, y)[0] as f32 / 255.0;
        let tint = [255.0, 40.0, 90.0];
        Rgb([0, 1, 2].map(|c| ((1.0 - a) * p[c] as f32 + a * tint[c]).round() as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_ends() {
        let lo = turbo(0.0);
        let mid = turbo(0.5);
        let hi = turbo(1.0);
        assert!(lo.iter().map(|&v| v as u32).sum::<u32>() < 150, "dark start {lo:?}");
        assert!(mid[1] > mid[2] && mid[1] > 150, "green-ish middle {mid:?}");
        assert!(hi[0] > hi[2], "red end {hi:?}");
    }

    #[test]
    fn saliency_contour_is_drawn() {
        let img = RgbImage::from_pixel(20, 20, Rgb([0, 0, 0]));
        let sal = GrayImage::from_fn(20, 20, |x, y| image::Luma([if (5..15).contains(&x) && (5..15).contains(&y) { 255 } else { 0 }]));
        let o = saliency_overlay(&img, &sal);
        assert_eq!(o.get_pixel(5, 10).0, [255, 230, 0]);
        assert_eq!(o.get_pixel(0, 0).0, [0, 0, 0]);
        assert_ne!(o.get_pixel(10, 10).0, [0, 0, 0]);
    }
}
