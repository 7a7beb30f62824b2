// draw: binary PPM input/output and detections drawn onto an RGB image (infer --draw).
//
// Plain C++17 with no TensorRT or CUDA, so that tests/test_cppapi.py can build and check it on any
// machine with g++. Header-only, so that every build of infer.cpp (CMake, scripts/check_plugins.sh)
// compiles it with no extra source to list.
//
// What a drawn detection looks like (tests/test_cppapi.py checks each rule pixel by pixel):
// - its box covers the pixels its edges touch, columns [floor(x1), ceil(x2)) and rows
//   [floor(y1), ceil(y2)), clipped to the image; nothing is drawn when none is left;
// - a 2-pixel outline inside that rectangle (its outer edge on the box) in the class's colour;
// - a label "CLASS SCORE" (score with two decimals) in a 5x7 font scaled 2x on a rectangle of the
//   class's colour, sitting on the box's top-left corner; below the box's top edge when there is no
//   room above it, and moved left when it would cross the image's right edge;
// - labels are drawn after every outline, and higher scores after lower ones.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace retinanet_cpp {

struct Detection {
  float x1, y1, x2, y2;  // the engine input's pixels: the image sits at its top left at its own size
  int cls;               // the model's contiguous class index
  float score;
};

struct Image {
  int width = 0, height = 0;
  std::vector<unsigned char> rgb;  // row after row, 3 bytes a pixel
};

using Colour = std::array<unsigned char, 3>;

// Half-open pixel rectangle: columns [x0, x1), rows [y0, y1).
struct Rect {
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  bool empty() const { return x1 <= x0 || y1 <= y0; }
};

constexpr int kOutline = 2;     // outline width in pixels
constexpr int kGlyphWidth = 5;  // font cell, before scaling
constexpr int kGlyphHeight = 7;
constexpr int kLabelScale = 2;  // each font pixel is a 2x2 square: 1 px strokes vanish on large images
constexpr int kLabelPad = 2;    // fill around the text
constexpr float kDefaultDrawThreshold = 0.3f;

// Hand-picked hues at least 95 apart in RGB, so that neighbouring class indices (often related
// classes) never look alike; class indices beyond the table cycle through it.
inline constexpr Colour kPalette[] = {
    {230, 40, 40}, {40, 100, 240}, {40, 180, 60},   {250, 220, 30}, {220, 50, 220}, {30, 220, 230},
    {250, 130, 0}, {120, 60, 190}, {160, 240, 100}, {0, 110, 130},  {140, 80, 30},  {255, 160, 200},
};
constexpr int kPaletteSize = static_cast<int>(sizeof(kPalette) / sizeof(kPalette[0]));

inline Colour class_colour(int cls) { return kPalette[((cls % kPaletteSize) + kPaletteSize) % kPaletteSize]; }

// Black text on light fills, white on dark ones (luma with the BT.601 weights, times 1000).
inline Colour text_colour(Colour fill) {
  int const luma = 299 * fill[0] + 587 * fill[1] + 114 * fill[2];
  return luma >= 128000 ? Colour{0, 0, 0} : Colour{255, 255, 255};
}

struct Glyph {
  char c;
  std::array<std::uint8_t, kGlyphHeight> rows;  // bit 4 is the leftmost column
};

// What labels need: digits, '.', ' ', '-' (a negative class) and the letters of "inf" and "nan"
// (scores that are not numbers), so that no label ever shows a hole.
inline constexpr Glyph kFont[] = {
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}}, {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}}, {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}}, {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}}, {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}}, {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}}, {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
    {' ', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}}, {'a', {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F}},
    {'f', {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08}}, {'i', {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E}},
    {'n', {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11}},
};

// A character the font lacks draws as a blank cell rather than failing: the label stays readable.
inline std::array<std::uint8_t, kGlyphHeight> glyph(char c) {
  for (Glyph const& g : kFont) {
    if (g.c == c) return g.rows;
  }
  return {};
}

inline std::string label_text(int cls, float score) {
  char text[64];
  std::snprintf(text, sizeof(text), "%d %.2f", cls, static_cast<double>(score));
  return text;
}

inline Rect clip(Rect r, int width, int height) {
  return {std::max(r.x0, 0), std::max(r.y0, 0), std::min(r.x1, width), std::min(r.y1, height)};
}

// Clamped in double before the conversion: a float far outside int's range would be undefined.
inline int pixel_edge(double v, int limit) { return static_cast<int>(std::min(std::max(v, 0.0), double(limit))); }

inline Rect box_pixels(Detection const& d, int width, int height) {
  if (!std::isfinite(d.x1) || !std::isfinite(d.y1) || !std::isfinite(d.x2) || !std::isfinite(d.y2)) return {};
  return {pixel_edge(std::floor(d.x1), width), pixel_edge(std::floor(d.y1), height), pixel_edge(std::ceil(d.x2), width),
          pixel_edge(std::ceil(d.y2), height)};
}

inline int label_width(std::size_t chars) {
  int const n = static_cast<int>(chars);
  return 2 * kLabelPad + n * kGlyphWidth * kLabelScale + std::max(n - 1, 0) * kLabelScale;
}

inline int label_height() { return 2 * kLabelPad + kGlyphHeight * kLabelScale; }

// Where the label goes for a (clipped, non-empty) box; it may still need clipping on an image
// smaller than the label itself.
inline Rect label_rect(Rect box, std::size_t chars, int width) {
  int const w = label_width(chars), h = label_height();
  int const x0 = box.x0 + w > width ? std::max(width - w, 0) : box.x0;
  int const y0 = box.y0 - h < 0 ? box.y0 : box.y0 - h;
  return {x0, y0, x0 + w, y0 + h};
}

inline void fill(Image* image, Rect r, Colour colour) {
  r = clip(r, image->width, image->height);
  for (int y = r.y0; y < r.y1; ++y) {
    for (int x = r.x0; x < r.x1; ++x) {
      std::size_t const at =
          (static_cast<std::size_t>(y) * static_cast<std::size_t>(image->width) + static_cast<std::size_t>(x)) * 3;
      std::copy(colour.begin(), colour.end(), image->rgb.begin() + static_cast<std::ptrdiff_t>(at));
    }
  }
}

// Four bands inside the box; a box thinner than two outlines comes out filled.
inline void draw_outline(Image* image, Rect b, Colour colour) {
  fill(image, {b.x0, b.y0, b.x1, std::min(b.y0 + kOutline, b.y1)}, colour);
  fill(image, {b.x0, std::max(b.y1 - kOutline, b.y0), b.x1, b.y1}, colour);
  fill(image, {b.x0, b.y0, std::min(b.x0 + kOutline, b.x1), b.y1}, colour);
  fill(image, {std::max(b.x1 - kOutline, b.x0), b.y0, b.x1, b.y1}, colour);
}

inline void draw_glyph(Image* image, int x, int y, char c, Colour colour) {
  int constexpr s = kLabelScale;
  auto const rows = glyph(c);
  for (int gy = 0; gy < kGlyphHeight; ++gy) {
    for (int gx = 0; gx < kGlyphWidth; ++gx) {
      bool const on = (rows[gy] >> (kGlyphWidth - 1 - gx)) & 1;
      if (on) fill(image, {x + gx * s, y + gy * s, x + (gx + 1) * s, y + (gy + 1) * s}, colour);
    }
  }
}

// One blank font column between characters.
inline void draw_text(Image* image, int x, int y, std::string const& text, Colour colour) {
  for (std::size_t i = 0; i < text.size(); ++i) {
    draw_glyph(image, x + static_cast<int>(i) * (kGlyphWidth + 1) * kLabelScale, y, text[i], colour);
  }
}

inline void draw_label(Image* image, Rect box, Detection const& d) {
  Colour const colour = class_colour(d.cls);
  std::string const text = label_text(d.cls, d.score);
  Rect const label = label_rect(box, text.size(), image->width);
  fill(image, label, colour);
  draw_text(image, label.x0 + kLabelPad, label.y0 + kLabelPad, text, text_colour(colour));
}

// Detections with score >= threshold: every outline, then every label, so that no label is crossed
// by a neighbour's outline; lowest score first in each pass, whatever order they come in, so that
// the best ones end up on top where they overlap (as retinanet/draw.py does for `retinanet infer`).
inline void draw_detections(Image* image, std::vector<Detection> const& detections, float threshold) {
  std::vector<Detection> drawn;
  std::copy_if(detections.begin(), detections.end(), std::back_inserter(drawn),
               [threshold](Detection const& d) { return d.score >= threshold; });
  std::stable_sort(drawn.begin(), drawn.end(),
                   [](Detection const& a, Detection const& b) { return a.score < b.score; });
  std::vector<Rect> boxes;
  for (Detection const& d : drawn) boxes.push_back(box_pixels(d, image->width, image->height));
  for (std::size_t i = 0; i < drawn.size(); ++i) {
    if (!boxes[i].empty()) draw_outline(image, boxes[i], class_colour(drawn[i].cls));
  }
  for (std::size_t i = 0; i < drawn.size(); ++i) {
    if (!boxes[i].empty()) draw_label(image, boxes[i], drawn[i]);
  }
}

// Binary PPM (P6, 8-bit), the format infer reads so that it needs no image library.
inline bool read_ppm(std::string const& path, Image* image) {
  std::ifstream f(path, std::ios::binary);
  std::string magic;
  int maxval = 0;
  if (!(f >> magic >> image->width >> image->height >> maxval) || magic != "P6" || maxval != 255) return false;
  if (image->width <= 0 || image->height <= 0) return false;
  f.get();  // the single whitespace character before the pixels
  // The pixels must be in the file before they are allocated: a damaged header could ask for gigabytes.
  std::streamoff const start = f.tellg();
  f.seekg(0, std::ios::end);
  std::streamoff const available = f.tellg() - start;
  std::size_t const bytes = static_cast<std::size_t>(image->width) * static_cast<std::size_t>(image->height) * 3;
  if (!f || available < 0 || static_cast<std::size_t>(available) < bytes) return false;
  f.seekg(start);
  image->rgb.resize(bytes);
  return static_cast<bool>(
      f.read(reinterpret_cast<char*>(image->rgb.data()), static_cast<std::streamsize>(image->rgb.size())));
}

inline bool write_ppm(std::string const& path, Image const& image) {
  std::ofstream f(path, std::ios::binary);
  f << "P6\n" << image.width << " " << image.height << "\n255\n";
  f.write(reinterpret_cast<char const*>(image.rgb.data()), static_cast<std::streamsize>(image.rgb.size()));
  return static_cast<bool>(f.flush());
}

}  // namespace retinanet_cpp
