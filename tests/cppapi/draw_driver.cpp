// Test driver for extras/cppapi/draw.h (tests/test_cppapi.py builds and runs it; no TensorRT, no CUDA).
//
//   draw_driver IN.ppm DETECTIONS.txt THRESHOLD OUT.ppm   draw, as infer --draw does
//   draw_driver --font CHARS                             each glyph: 7 rows of 5 '#' or '.'
//   draw_driver --palette N                              the colours of classes 0..N-1, "R G B" a line
//
// DETECTIONS.txt holds "x1 y1 x2 y2 class score" a line; numbers go through strtof so that the tests
// can pass nan and inf. The font and the palette are printed so that the test's own rendering of the
// rules uses the same glyphs and colours instead of a copy of them.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "draw.h"

namespace {

using retinanet_cpp::Detection;

bool read_detections(std::string const& path, std::vector<Detection>* out) {
  std::ifstream f(path);
  if (!f) return false;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream fields(line);
    std::string x1, y1, x2, y2, cls, score;
    if (!(fields >> x1 >> y1 >> x2 >> y2 >> cls >> score)) continue;  // blank line
    out->push_back({std::strtof(x1.c_str(), nullptr), std::strtof(y1.c_str(), nullptr),
                    std::strtof(x2.c_str(), nullptr), std::strtof(y2.c_str(), nullptr), std::atoi(cls.c_str()),
                    std::strtof(score.c_str(), nullptr)});
  }
  return true;
}

void print_font(char const* chars) {
  for (char const* c = chars; *c; ++c) {
    for (std::uint8_t row : retinanet_cpp::glyph(*c)) {
      for (int x = retinanet_cpp::kGlyphWidth - 1; x >= 0; --x) std::cout << ((row >> x) & 1 ? '#' : '.');
      std::cout << "\n";
    }
  }
}

void print_palette(int n) {
  for (int cls = 0; cls < n; ++cls) {
    retinanet_cpp::Colour const c = retinanet_cpp::class_colour(cls);
    std::cout << int(c[0]) << " " << int(c[1]) << " " << int(c[2]) << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && !std::strcmp(argv[1], "--font")) {
    print_font(argv[2]);
    return 0;
  }
  if (argc == 3 && !std::strcmp(argv[1], "--palette")) {
    print_palette(std::atoi(argv[2]));
    return 0;
  }
  if (argc != 5) {
    std::cerr << "usage: draw_driver IN.ppm DETECTIONS.txt THRESHOLD OUT.ppm | --font CHARS | --palette N\n";
    return 2;
  }
  retinanet_cpp::Image image;
  std::vector<Detection> detections;
  if (!retinanet_cpp::read_ppm(argv[1], &image)) {
    std::cerr << "draw_driver: " << argv[1] << " is not a binary 8-bit PPM\n";
    return 1;
  }
  if (!read_detections(argv[2], &detections)) {
    std::cerr << "draw_driver: cannot read " << argv[2] << "\n";
    return 1;
  }
  retinanet_cpp::draw_detections(&image, detections, std::strtof(argv[3], nullptr));
  if (!retinanet_cpp::write_ppm(argv[4], image)) {
    std::cerr << "draw_driver: cannot write " << argv[4] << "\n";
    return 1;
  }
  return 0;
}
