// tests/test_wordcount.cpp - the word count that chapters 4 and 7 check their parallel runs
// against (common/wordcount.hpp): what a word is, how the text is cut, how input is read.
#include <catch2/catch.hpp>

#include <fstream>
#include <string>

#include "run.hpp"
#include "wordcount.hpp"

using wordcount::Counts;

TEST_CASE("wordcount: words are lower-cased runs of letters and apostrophes", "[wordcount]") {
  Counts c = wordcount::count("The cat, the CAT; the-cat!\n");
  CHECK(c == Counts{{"the", 3}, {"cat", 3}});

  SECTION("apostrophes inside a word stay, at its ends they go") {
    CHECK(wordcount::count("don't 'quoted' ''' rock'n'roll it\u2019s")
          == Counts{{"don't", 1}, {"quoted", 1}, {"rock'n'roll", 1}, {"it\u2019s", 1}});
  }
  SECTION("digits and punctuation separate words") {
    CHECK(wordcount::count("abc123def 4 x_y") == Counts{{"abc", 1}, {"def", 1}, {"x", 1}, {"y", 1}});
  }
  SECTION("non-ASCII letters are letters and are lower-cased") {
    CHECK(wordcount::count("Éte ÉTÉ straße Жук жук") ==
          Counts{{"éte", 1}, {"été", 1}, {"straße", 1}, {"жук", 2}});
  }
  SECTION("invalid UTF-8 separates words and never crashes") {
    CHECK(wordcount::count(std::string("ab\xff" "cd\xc3", 7)) == Counts{{"ab", 1}, {"cd", 1}});
    CHECK(wordcount::count(std::string("\xe2\x80", 2)).empty());
  }
  SECTION("an empty text and a text without a trailing newline") {
    CHECK(wordcount::count("").empty());
    CHECK(wordcount::count("last word") == Counts{{"last", 1}, {"word", 1}});
  }
}

TEST_CASE("wordcount: split never cuts a word, and counting the pieces equals the whole",
          "[wordcount]") {
  std::string text = "alpha beta\tgamma\ndelta épsilon   ζῆτα long-word-without-spaces-at-all end";
  Counts whole = wordcount::count(text);
  for (std::size_t parts : {1u, 2u, 3u, 5u, 8u, 64u, 1000u}) {
    INFO("parts " << parts);
    auto pieces = wordcount::split(text, parts);
    REQUIRE(!pieces.empty());
    CHECK(pieces.size() <= parts);
    CHECK(pieces.front().first == 0);
    CHECK(pieces.back().second == text.size());
    Counts sum;
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      if (i > 0) CHECK(pieces[i].first == pieces[i - 1].second);
      CHECK(pieces[i].first < pieces[i].second);
      wordcount::count_into(std::string_view(text).substr(pieces[i].first,
                                                          pieces[i].second - pieces[i].first),
                            sum);
    }
    CHECK(sum == whole);
  }
  CHECK(wordcount::split("", 4).empty());
}

TEST_CASE("wordcount: top orders by count, then by word", "[wordcount]") {
  Counts c{{"b", 2}, {"a", 2}, {"c", 5}, {"d", 1}};
  using Top = std::vector<std::pair<std::string, std::uint64_t>>;
  CHECK(wordcount::top(c, 3) == Top{{"c", 5}, {"a", 2}, {"b", 2}});
  CHECK(wordcount::top(c, 10).size() == 4);
  CHECK(wordcount::total(c) == 10);
  Counts m{{"a", 1}, {"z", 1}};
  wordcount::merge_into(c, m);
  CHECK(m == Counts{{"a", 3}, {"b", 2}, {"c", 5}, {"d", 1}, {"z", 1}});
}

TEST_CASE("wordcount: partition_of is stable and in range", "[wordcount]") {
  CHECK(wordcount::partition_of("hello", 7) == wordcount::partition_of("hello", 7));
  CHECK(wordcount::partition_of("hello", 1) == 0);
  // FNV-1a's value is fixed by its definition: the same on every build and machine.
  CHECK(wordcount::partition_of("a", 1000) == 0xaf63dc4c8601ec8cull % 1000);
}

TEST_CASE("wordcount: read_input reads a file or a folder, and refuses a missing path",
          "[wordcount]") {
  auto dir = testing::scratch_dir("wordcount");
  std::filesystem::create_directories(dir / "sub");
  std::ofstream(dir / "b.txt") << "two";  // no trailing newline: must not join "one"
  std::ofstream(dir / "sub" / "a.txt") << "one\n";
  std::ofstream(dir / "empty.txt");
  std::filesystem::create_symlink("b.txt", dir / "link-to-b.txt");  // read once, not twice
  auto text = wordcount::read_input(dir);
  CHECK(text.files == 3);
  CHECK(wordcount::count(text.bytes) == Counts{{"one", 1}, {"two", 1}});
  CHECK(wordcount::read_input(dir / "b.txt").files == 1);
  CHECK_THROWS_WITH(wordcount::read_input(dir / "missing"),
                    Catch::Contains("cannot read") && Catch::Contains("missing"));
  CHECK(!wordcount::read_input(wordcount::kDefaultInput).bytes.empty());
  std::filesystem::remove_all(dir);
}
