// mapreduce_example.cpp - MapReduce word count on real text, equal to a serial count word for word.
//
// The text is cut into chunks at whitespace (never inside a word). Mappers, in a pool,
// count the words of their chunk - the combiner: one (word, count) pair per word and chunk
// instead of one per occurrence - and sort the pairs into R partitions by a hash of the
// word, so that every occurrence of a word, from every chunk, goes to the same reducer.
// The shuffle hands partition r of every mapper to reducer r; reducers, in a second pool,
// add up their partitions; the merge puts the R disjoint results together. The counts must
// equal a serial count of the same text, word for word: the lesson checks every word.
//
// A word is a maximal run of letters and apostrophes, lower-cased, read as UTF-8
// (common/wordcount.hpp): "Don't", "don't" and "DON'T" are one word, "été" is a word,
// "x86" is the word "x". The default input is the licence texts that Debian's base-files
// package installs in /usr/share/common-licenses, so it is on every machine.
//
// Usage: mapreduce_example [--input PATH] [--mappers M] [--reducers R] [--chunks C]
//                          [--top N] [--json]
//   $ build/4_patterns/mapreduce_example --mappers 2 --reducers 2 --top 10
//
// Watch for: the combiner shrinks what the shuffle moves several times over; each word
// lands in exactly one partition; the counts equal the serial ones however many chunks,
// mappers and reducers you choose; on the default 300 KB the "speed-up" is below 1:
// building a table per chunk and moving the pairs costs as much as the counting itself.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <mp/pool.hpp>
#include <mp/process.hpp>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "lesson.hpp"
#include "wordcount.hpp"

namespace {

using Pairs = std::vector<std::pair<std::string, std::uint64_t>>;

// Map and combine: the words of one chunk, counted, in `reducers` partitions by word.
std::vector<Pairs> map_chunk(std::string chunk, std::uint32_t reducers) {
  wordcount::Counts local = wordcount::count(chunk);
  std::vector<Pairs> partitions(reducers);
  for (auto& [word, n] : local) {
    partitions[wordcount::partition_of(word, reducers)].emplace_back(word, n);
  }
  return partitions;
}

// Reduce: one partition's pairs from every mapper, added up. Also counts pairs that do not
// belong here (none, if the mappers partitioned as they should).
std::pair<Pairs, std::uint64_t> reduce_partition(std::uint32_t partition, std::uint32_t reducers,
                                                 std::vector<Pairs> from_mappers) {
  wordcount::Counts sums;
  std::uint64_t misrouted = 0;
  for (const Pairs& pairs : from_mappers) {
    for (const auto& [word, n] : pairs) {
      misrouted += wordcount::partition_of(word, reducers) != partition;
      sums[word] += n;
    }
  }
  return {Pairs(sums.begin(), sums.end()), misrouted};
}

// Words whose counts differ between a and b (a word missing from one counts as 0 there).
std::uint64_t differing_words(const wordcount::Counts& a, const wordcount::Counts& b) {
  std::uint64_t d = 0;
  for (const auto& [word, n] : a) {
    auto it = b.find(word);
    d += it == b.end() || it->second != n;
  }
  for (const auto& [word, n] : b) d += !a.count(word);
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "MapReduce word count on real text, equal to a serial count word for word."};
  std::string input = wordcount::kDefaultInput;
  int mappers = std::clamp(mp::cpu_count(), 2, 8), reducers = mappers, chunks = 0, top_n = 10;
  auto& cli = L.cli();
  cli.add_option("--input", input, "a text file, or a folder read recursively")
      ->check(CLI::ExistingPath)
      ->capture_default_str();
  cli.add_option("--mappers", mappers, "worker processes of the map phase")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cli.add_option("--reducers", reducers, "partitions, and worker processes of the reduce phase")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cli.add_option("--chunks", chunks, "pieces the text is cut into (0: 4 per mapper)")
      ->check(CLI::Range(0, 1'000'000))
      ->capture_default_str();
  cli.add_option("--top", top_n, "how many of the most frequent words to show")
      ->check(CLI::Range(1, 1'000'000))
      ->capture_default_str();
  L.parse(argc, argv);

  return L.run([&] {
    const auto R = std::uint32_t(reducers);
    if (chunks == 0) chunks = 4 * mappers;

    // Step 1: the input, and the serial count that the parallel one must equal.
    L.step("the input and the serial count");
    wordcount::Text text = wordcount::read_input(input);
    auto t0 = std::chrono::steady_clock::now();
    wordcount::Counts serial = wordcount::count(text.bytes);
    double serial_s = lesson::seconds_since(t0);
    L.say("{}: {} files, {} bytes; serially {} words, {} distinct, in {:.3f} s", input, text.files,
          text.bytes.size(), wordcount::total(serial), serial.size(), serial_s);

    // The pools start before the clock does: their start-up is not part of the job.
    t0 = std::chrono::steady_clock::now();
    mp::Pool map_pool{mappers};
    mp::Pool reduce_pool{reducers};
    double pools_s = lesson::seconds_since(t0);

    // Step 2: split at whitespace, and map: each chunk counted and partitioned in a worker.
    L.step(fmt::format("map: {} chunks on {} mappers, {} partitions", chunks, mappers, R));
    auto start = std::chrono::steady_clock::now();
    std::vector<std::tuple<std::string, std::uint32_t>> tasks;
    for (auto [begin, end] : wordcount::split(text.bytes, std::size_t(chunks))) {
      tasks.emplace_back(text.bytes.substr(begin, end - begin), R);
    }
    auto mapped = map_pool.starmap(map_chunk, tasks, 1);
    double map_s = lesson::seconds_since(start);
    std::uint64_t pairs = 0;
    for (const auto& parts : mapped) {
      for (const auto& p : parts) pairs += p.size();
    }
    L.say(
        "{} chunks (cut at whitespace) -> {} (word, count) pairs for {} words: the combiner "
        "sends {:.1f}x fewer, in {:.3f} s",
        tasks.size(), pairs, wordcount::total(serial),
        pairs ? double(wordcount::total(serial)) / double(pairs) : 0.0, map_s);

    // Step 3: shuffle - partition r of every mapper goes to reducer r.
    L.step("shuffle and reduce");
    auto t_shuffle = std::chrono::steady_clock::now();
    std::vector<std::tuple<std::uint32_t, std::uint32_t, std::vector<Pairs>>> inputs;
    for (std::uint32_t r = 0; r < R; ++r) inputs.emplace_back(r, R, std::vector<Pairs>{});
    for (auto& parts : mapped) {
      for (std::uint32_t r = 0; r < R; ++r) std::get<2>(inputs[r]).push_back(std::move(parts[r]));
    }
    double shuffle_s = lesson::seconds_since(t_shuffle);

    // Reduce: each partition added up in a worker of the second pool.
    auto t_reduce = std::chrono::steady_clock::now();
    auto reduced = reduce_pool.starmap(reduce_partition, inputs, 1);
    double reduce_s = lesson::seconds_since(t_reduce);

    // Step 4: merge. The partitions are disjoint: each word comes from one reducer only.
    auto t_merge = std::chrono::steady_clock::now();
    wordcount::Counts parallel;
    std::uint64_t in_two = 0, misrouted = 0;
    std::vector<std::size_t> partition_sizes;
    for (auto& [words, wrong] : reduced) {
      misrouted += wrong;
      partition_sizes.push_back(words.size());
      for (auto& [word, n] : words) in_two += !parallel.emplace(std::move(word), n).second;
    }
    double merge_s = lesson::seconds_since(t_merge);
    double parallel_s = lesson::seconds_since(start);
    L.say(
        "distinct words per partition: {}; a word in two partitions: {}; pairs sent to the "
        "wrong reducer: {}",
        partition_sizes, in_two, misrouted);
    L.say("shuffle {:.3f} s, reduce {:.3f} s, merge {:.3f} s", shuffle_s, reduce_s, merge_s);
    map_pool.close();
    reduce_pool.close();
    map_pool.join();
    reduce_pool.join();

    // Step 5: the check, word for word, and the answer.
    L.step("the result");
    std::uint64_t differing = differing_words(serial, parallel);
    bool equal = differing == 0 && parallel == serial;
    auto top = wordcount::top(parallel, std::size_t(top_n));
    for (std::size_t i = 0; i < top.size(); ++i) {
      L.say("  {:>3}. {:<16} {:>8}", i + 1, top[i].first, top[i].second);
    }
    L.say("{} words, {} distinct; equal to the serial count word for word: {} ({} differ)",
          wordcount::total(parallel), parallel.size(), equal, differing);
    L.say(
        "map-reduce {:.3f} s against serial {:.3f} s: speed-up {:.2f}x (starting the two pools "
        "took {:.3f} s more)",
        parallel_s, serial_s, serial_s / parallel_s, pools_s);

    nlohmann::json top_json = nlohmann::json::array();
    for (const auto& [word, n] : top) top_json.push_back({word, n});
    L.fact("input", input);
    L.fact("files", text.files);
    L.fact("bytes", text.bytes.size());
    L.fact("mappers", mappers);
    L.fact("reducers", reducers);
    L.fact("chunks", tasks.size());
    L.fact("top", top_json);
    L.fact("total_words", wordcount::total(parallel));
    L.fact("distinct_words", parallel.size());
    L.fact("serial_total_words", wordcount::total(serial));
    L.fact("serial_distinct_words", serial.size());
    L.fact("counts_equal_serial", equal);
    L.fact("differing_words", differing);
    L.fact("shuffled_pairs", pairs);
    L.fact("partition_sizes", partition_sizes);
    L.fact("words_in_two_partitions", in_two);
    L.fact("misrouted_pairs", misrouted);
    L.fact("seconds", nlohmann::json{{"serial", serial_s},
                                     {"pools_start", pools_s},
                                     {"map", map_s},
                                     {"shuffle", shuffle_s},
                                     {"reduce", reduce_s},
                                     {"merge", merge_s},
                                     {"parallel", parallel_s}});
    L.fact("speedup", serial_s / parallel_s);
    L.fact("children_left", mp::active_children().size());
    return equal && in_two == 0 && misrouted == 0 && mp::active_children().empty();
  });
}
