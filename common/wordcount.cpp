// common/wordcount.cpp - the shared word count (see wordcount.hpp).
#include "wordcount.hpp"

#include <locale.h>
#include <wctype.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <set>
#include <stdexcept>

namespace wordcount {
namespace {

// The C.UTF-8 locale, whatever the environment's locale is, so that every process and
// machine classifies letters alike. glibc builds it in (2.35 and later).
locale_t utf8_locale() {
  static const locale_t loc = [] {
    locale_t l = ::newlocale(LC_CTYPE_MASK, "C.UTF-8", locale_t{});
    if (l == locale_t{}) throw std::runtime_error("cannot load the C.UTF-8 locale");
    return l;
  }();
  return loc;
}

constexpr char32_t kInvalid = 0xFFFFFFFF;

// Decodes the UTF-8 character at text[i] and sets `len` to its length in bytes (1 for an
// invalid byte, which then decodes to kInvalid).
char32_t decode(std::string_view text, std::size_t i, std::size_t& len) {
  auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  unsigned char b = byte(i);
  len = 1;
  if (b < 0x80) return b;
  std::size_t need;
  char32_t cp;
  char32_t min;
  if ((b & 0xE0) == 0xC0) {
    need = 1, cp = b & 0x1F, min = 0x80;
  } else if ((b & 0xF0) == 0xE0) {
    need = 2, cp = b & 0x0F, min = 0x800;
  } else if ((b & 0xF8) == 0xF0) {
    need = 3, cp = b & 0x07, min = 0x10000;
  } else {
    return kInvalid;
  }
  for (std::size_t k = 1; k <= need; ++k) {
    if (i + k >= text.size() || (byte(i + k) & 0xC0) != 0x80) return kInvalid;
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return kInvalid;
  len = need + 1;
  return cp;
}

void encode(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool is_apostrophe(char32_t cp) { return cp == U'\'' || cp == U'\u2019'; }

bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
  return cp != kInvalid && ::iswalpha_l(static_cast<wint_t>(cp), utf8_locale()) != 0;
}

char32_t lower(char32_t cp) {
  if (cp < 0x80) return (cp >= 'A' && cp <= 'Z') ? cp + ('a' - 'A') : cp;
  return static_cast<char32_t>(::towlower_l(static_cast<wint_t>(cp), utf8_locale()));
}

bool is_space(char c) {
  return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\f' || c == '\v';
}

void read_file(const std::filesystem::path& file, std::string& out) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + file.string() + ": cannot open it");
  out.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error("cannot read " + file.string());
  out += '\n';
}

}  // namespace

Text read_input(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  auto status = fs::status(path, ec);
  if (ec || !fs::exists(status)) {
    throw std::runtime_error("cannot read " + path.string() + ": no such file or folder");
  }
  Text text;
  if (!fs::is_directory(status)) {
    read_file(path, text.bytes);
    text.files = 1;
    return text;
  }
  std::vector<fs::path> files;
  for (fs::recursive_directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_regular_file(ec)) files.push_back(it->path());
  }
  if (ec) throw std::runtime_error("cannot read the folder " + path.string() + ": " + ec.message());
  // A file reached twice (a symbolic link beside its target, as GPL -> GPL-3 in
  // /usr/share/common-licenses) is read once: the text, not the directory, is counted.
  std::sort(files.begin(), files.end());
  std::set<fs::path> seen;
  for (const auto& f : files) {
    if (!seen.insert(fs::weakly_canonical(f, ec)).second) continue;
    read_file(f, text.bytes);
    ++text.files;
  }
  return text;
}

std::vector<std::pair<std::size_t, std::size_t>> split(std::string_view text,
                                                       std::size_t parts) {
  std::vector<std::pair<std::size_t, std::size_t>> pieces;
  if (parts == 0) parts = 1;
  std::size_t target = text.size() / parts + 1;
  std::size_t begin = 0;
  while (begin < text.size()) {
    std::size_t end = std::min(text.size(), begin + target);
    // Move the cut forward to just after the next whitespace byte: a whitespace byte is
    // never part of a word nor of a multi-byte UTF-8 character.
    while (end < text.size() && !is_space(text[end - 1])) ++end;
    pieces.emplace_back(begin, end);
    begin = end;
  }
  return pieces;
}

void count_into(std::string_view text, Counts& into) {
  std::string word;
  std::size_t trailing_apostrophes = 0;  // bytes of apostrophes at the end of `word`
  auto finish = [&] {
    word.resize(word.size() - trailing_apostrophes);
    if (!word.empty()) ++into[word];
    word.clear();
    trailing_apostrophes = 0;
  };
  for (std::size_t i = 0; i < text.size();) {
    std::size_t len;
    char32_t cp = decode(text, i, len);
    if (is_letter(cp)) {
      encode(lower(cp), word);
      trailing_apostrophes = 0;
    } else if (is_apostrophe(cp)) {
      if (!word.empty()) {  // a leading apostrophe is dropped at once
        std::size_t before = word.size();
        encode(cp, word);
        trailing_apostrophes += word.size() - before;
      }
    } else {
      finish();
    }
    i += len;
  }
  finish();
}

Counts count(std::string_view text) {
  Counts counts;
  count_into(text, counts);
  return counts;
}

void merge_into(const Counts& from, Counts& into) {
  for (const auto& [word, n] : from) into[word] += n;
}

std::uint64_t total(const Counts& counts) {
  std::uint64_t sum = 0;
  for (const auto& entry : counts) sum += entry.second;
  return sum;
}

std::vector<std::pair<std::string, std::uint64_t>> top(const Counts& counts, std::size_t n) {
  std::vector<std::pair<std::string, std::uint64_t>> all(counts.begin(), counts.end());
  auto order = [](const auto& a, const auto& b) {
    return a.second != b.second ? a.second > b.second : a.first < b.first;
  };
  n = std::min(n, all.size());
  std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), all.end(), order);
  all.resize(n);
  return all;
}

std::size_t partition_of(std::string_view word, std::size_t partitions) {
  std::uint64_t h = 14695981039346656037ull;
  for (char c : word) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ull;
  }
  return static_cast<std::size_t>(h % (partitions == 0 ? 1 : partitions));
}

}  // namespace wordcount
