// common/wordcount.hpp - the word count that chapters 4 and 7 run in parallel and check
// against a serial count: one tokenizer, one way to read the input, one way to cut it.
//
//   wordcount::Text text = wordcount::read_input("/usr/share/common-licenses");
//   wordcount::Counts serial = wordcount::count(text.bytes);
//   for (auto [begin, end] : wordcount::split(text.bytes, 8)) ...   // never inside a word
//   auto top = wordcount::top(serial, 10);                            // by count, then word
//
// What a word is (the same for every lesson, serial or parallel):
// - a maximal run of letters and apostrophes, lower-cased, read as UTF-8;
// - a letter is any code point that the C.UTF-8 locale calls alphabetic (so "é", "ß" and
//   "ж" are letters), lower-cased by the same locale ("É" -> "é");
// - apostrophes are ' and U+2019; those at the start or end of a run are dropped
//   ("'quoted'" -> "quoted", "don't" stays), and a run of apostrophes alone is no word;
// - anything else separates words, including bytes that are not valid UTF-8.
//
// It belongs to the curriculum, not to the mp library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace wordcount {

using Counts = std::unordered_map<std::string, std::uint64_t>;

// The input as one text: every regular file under `path` (the file itself, or a folder
// read recursively, in sorted path order, a file that two links reach read once), each
// followed by a newline so that no word joins two files. Throws std::runtime_error ("cannot read ...") when the path is missing or a
// file cannot be read.
struct Text {
  std::string bytes;
  std::size_t files = 0;
};
Text read_input(const std::filesystem::path& path);

// Text that is on every machine the project supports: the licence texts Debian installs
// with base-files (an essential package).
inline constexpr const char* kDefaultInput = "/usr/share/common-licenses";

// Cuts `text` into at most `parts` pieces of about equal size, each ending just after an
// ASCII whitespace byte (or at the end), so that no word and no UTF-8 character is cut.
// Returns [begin, end) byte offsets covering the whole text in order; empty pieces are left
// out, so an empty text gives none.
std::vector<std::pair<std::size_t, std::size_t>> split(std::string_view text,
                                                       std::size_t parts);

// Adds the words of `text` to `into`.
void count_into(std::string_view text, Counts& into);
Counts count(std::string_view text);

// Adds every count of `from` to `into`.
void merge_into(const Counts& from, Counts& into);

// The sum of all counts.
std::uint64_t total(const Counts& counts);

// The `n` most frequent words, by count (highest first), ties by word (byte order).
std::vector<std::pair<std::string, std::uint64_t>> top(const Counts& counts, std::size_t n);

// Which of `partitions` reducers owns `word`: the same answer in every process and on
// every machine (FNV-1a of the bytes, not std::hash, whose value may differ between
// builds).
std::size_t partition_of(std::string_view word, std::size_t partitions);

}  // namespace wordcount
