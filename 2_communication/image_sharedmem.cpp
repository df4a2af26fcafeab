// image_sharedmem.cpp - Workers turn a shared-memory RGB image gray, a band of rows each.
//
// The grayscale filter of seed 003 §5.3. The parent draws a picture into a named
// mp::SharedMemory segment; each worker attaches to it by name and converts its band of
// rows in place (gray = 0.299 R + 0.587 G + 0.114 B, in integers). Nothing is copied to
// the workers or back: the bytes stay where they are. A serial run on a private copy gives
// the checksum the parallel result must match. --out DIR writes both pictures as PNG.
//
// Usage: image_sharedmem [--width W] [--height H] [--workers N] [--seed S] [--out DIR] [--json]
//   $ build/2_communication/image_sharedmem --workers 4 --out /tmp/img
//
// Watch for: the bands cover every row exactly once (the last band takes the remainder);
// the parallel checksum equals the serial one; with --out, input.png is colourful and
// output.png the same picture in gray.
#include <fmt/format.h>
#include <png.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <mp/process.hpp>
#include <mp/shared_memory.hpp>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {

// Draws a gradient with some filled circles: a picture that shows the filter at work.
void draw(std::span<std::uint8_t> rgb, int w, int h, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  struct Circle {
    int x, y, r;
    std::uint8_t c[3];
  };
  std::vector<Circle> circles(12);
  for (auto& c : circles) {
    c = {static_cast<int>(rng() % static_cast<unsigned>(w)),
         static_cast<int>(rng() % static_cast<unsigned>(h)),
         static_cast<int>(rng() % static_cast<unsigned>(std::max(2, std::min(w, h) / 4))) + 1,
         {static_cast<std::uint8_t>(rng()), static_cast<std::uint8_t>(rng()),
          static_cast<std::uint8_t>(rng())}};
  }
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      std::uint8_t* p = &rgb[(static_cast<std::size_t>(y) * w + x) * 3];
      p[0] = static_cast<std::uint8_t>(255 * x / std::max(1, w - 1));
      p[1] = static_cast<std::uint8_t>(255 * y / std::max(1, h - 1));
      p[2] = 160;
      for (const auto& c : circles) {
        long dx = x - c.x, dy = y - c.y;
        if (dx * dx + dy * dy <= static_cast<long>(c.r) * c.r) std::copy(c.c, c.c + 3, p);
      }
    }
  }
}

// The filter, on rows [from, to).
void to_gray(std::span<std::uint8_t> rgb, int w, int from, int to) {
  for (std::size_t i = static_cast<std::size_t>(from) * w; i < static_cast<std::size_t>(to) * w;
       ++i) {
    std::uint8_t* p = &rgb[i * 3];
    auto gray = static_cast<std::uint8_t>((299 * p[0] + 587 * p[1] + 114 * p[2] + 500) / 1000);
    p[0] = p[1] = p[2] = gray;
  }
}

// A worker: attach to the image by name, filter its band, leave.
void filter_band(std::string name, int w, int from, int to) {
  auto shm = mp::SharedMemory::attach(name);
  to_gray(shm.as<std::uint8_t>(), w, from, to);
}

// FNV-1a, 64 bits: equal pictures, equal checksums.
std::string checksum(std::span<const std::uint8_t> bytes) {
  std::uint64_t h = 1469598103934665603ULL;
  for (std::uint8_t b : bytes) h = (h ^ b) * 1099511628211ULL;
  return fmt::format("{:016x}", h);
}

// libpng's simplified API: one call, no setjmp.
void write_png(const std::filesystem::path& path, std::span<const std::uint8_t> rgb, int w, int h) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(w);
  image.height = static_cast<png_uint_32>(h);
  image.format = PNG_FORMAT_RGB;
  if (!png_image_write_to_file(&image, path.c_str(), 0, rgb.data(), w * 3, nullptr)) {
    throw std::runtime_error(fmt::format("cannot write {}: {}", path.string(), image.message));
  }
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "Workers turn a shared-memory RGB image gray, a band of rows each."};
  int& workers = L.add_workers(4, 256);
  std::uint64_t& seed = L.add_seed(3);
  int width = 640, height = 480;
  std::string out_dir;
  L.cli().add_option("--width", width, "image width in pixels")->check(CLI::Range(1, 8192));
  L.cli().add_option("--height", height, "image height in pixels")->check(CLI::Range(1, 8192));
  L.cli().add_option("--out", out_dir, "write input.png and output.png into this directory");
  L.parse(argc, argv);

  return L.run([&] {
    using clock = std::chrono::steady_clock;
    std::size_t bytes = static_cast<std::size_t>(width) * height * 3;

    // Step 1: the picture, drawn straight into shared memory.
    L.step("draw an image into shared memory");
    auto shm = mp::SharedMemory::create(bytes);
    std::span<std::uint8_t> image = shm.as<std::uint8_t>();
    draw(image, width, height, seed);
    std::vector<std::uint8_t> original(image.begin(), image.end());
    L.say("{}x{} RGB, {:.1f} MiB in '{}'", width, height, static_cast<double>(bytes) / 1048576.0,
          shm.name());

    // Step 2: the reference: one process filters a private copy.
    L.step("serial reference");
    std::vector<std::uint8_t> serial = original;
    auto t0 = clock::now();
    to_gray(serial, width, 0, height);
    double serial_s = lesson::seconds_since(t0);
    std::string serial_sum = checksum(serial);
    L.say("serial filter: {:.1f} ms, checksum {}", serial_s * 1e3, serial_sum);

    // Step 3: workers filter their bands in place; the last band takes the remainder.
    int n = std::min(workers, height);  // no empty bands
    L.step(fmt::format("{} workers, a band of rows each", n));
    std::vector<std::pair<int, int>> bands;
    int rows = height / n;
    for (int i = 0; i < n; ++i) bands.emplace_back(i * rows, i == n - 1 ? height : (i + 1) * rows);
    t0 = clock::now();
    std::vector<mp::Process> procs;
    for (auto [from, to] : bands) procs.emplace_back(filter_band, shm.name(), width, from, to);
    for (auto& p : procs) p.start();
    bool all_ok = true;
    for (auto& p : procs) {
      p.join();
      all_ok = all_ok && p.exitcode() == 0;
    }
    double parallel_s = lesson::seconds_since(t0);
    for (std::size_t i = 0; i < bands.size(); ++i) {
      L.say("  worker {}: rows {}-{}", i, bands[i].first, bands[i].second - 1);
    }
    std::string parallel_sum = checksum(image);
    L.say("parallel filter (with process start-up): {:.1f} ms, checksum {}", parallel_s * 1e3,
          parallel_sum);
    L.say("equal to the serial run: {}", parallel_sum == serial_sum);

    // Step 4: the pictures, if asked for.
    std::vector<std::string> written;
    if (!out_dir.empty()) {
      std::filesystem::path dir(out_dir);
      std::filesystem::create_directories(dir);
      write_png(dir / "input.png", original, width, height);
      write_png(dir / "output.png", image, width, height);
      written = {(dir / "input.png").string(), (dir / "output.png").string()};
      L.say("wrote {} and {}", written[0], written[1]);
    }

    L.fact("width", width);
    L.fact("height", height);
    L.fact("workers", n);
    L.fact("bands", bands);
    L.fact("checksum", parallel_sum);
    L.fact("serial_checksum", serial_sum);
    L.fact("checksum_equals_serial", parallel_sum == serial_sum);
    L.fact("changed_by_filter", checksum(original) != parallel_sum);
    L.fact("serial_ms", serial_s * 1e3);
    L.fact("parallel_ms", parallel_s * 1e3);
    L.fact("files", written);
    return all_ok && parallel_sum == serial_sum;
  });
}
