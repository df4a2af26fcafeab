// mpi_mapreduce.cpp - The word count over MPI ranks on one machine or several: scatter, map,
// shuffle, gather.
//
// MPI runs one program N times (N "ranks", started by mpirun on one machine or on the hosts
// of a hostfile) and gives them collective operations. Here rank 0 reads the text and
// scatters one piece to each rank (MPI_Scatterv); every rank counts its piece (map), sends
// each word's count to the rank that owns the word - partition_of(word, N), the same on
// every machine - in one MPI_Alltoallv (shuffle), adds up what it received (reduce), and
// rank 0 gathers the disjoint results (MPI_Gatherv), checks them against a serial count
// and prints the top words. Nothing is shared but messages, so the same binary runs across
// machines unchanged.
//
// Usage: mpi_mapreduce [--input PATH] [--top N] [--out FILE] [--json]
//   $ mpirun -np 2 build/7_integration/mpi_mapreduce --input /usr/share/common-licenses
//   $ mpirun -np 4 --hostfile hosts build/7_integration/mpi_mapreduce   # several machines
//   $ build/7_integration/mpi_mapreduce        # without mpirun: one rank does everything
// As root, Open MPI refuses to start unless OMPI_ALLOW_RUN_AS_ROOT=1 and
// OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are set (./playground run and tour set them).
//
// Watch for: each rank maps about 1/N of the bytes but owns a different 1/N of the words;
// no word is owned by two ranks; the gathered counts equal the serial count exactly.
#include <fmt/ranges.h>
#include <mpi.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mp/error.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "lesson.hpp"
#include "wordcount.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// Throws "cannot <what>: <MPI's message>" when an MPI call fails. The communicator is set
// to return errors (MPI_ERRORS_RETURN) instead of ending the job on the spot.
void check(int rc, std::string_view what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw std::runtime_error(fmt::format("cannot {}: {}", what, std::string_view(text, len)));
}

// Whether mpirun (or orted) started this process; otherwise it is a "singleton", one rank.
bool under_mpirun() { return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr; }

// MPI_Init and MPI_Finalize, once each. Started by mpirun, a rank also dies with the
// launcher that started it (mpirun here, orted on another host): a launcher killed by
// SIGKILL cannot stop its ranks, and a rank left alone would spin in a collective for ever.
// Started alone, it tells Open MPI not to start a helper daemon (orted) that it would only
// need to spawn more processes, and that would outlive it for a moment.
class Session {
 public:
  Session(int& argc, char**& argv) {
    if (under_mpirun()) {
      pid_t launcher = ::getppid();
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) == -1 || ::getppid() != launcher) std::_Exit(1);
    } else if (::setenv("OMPI_MCA_ess_singleton_isolated", "1", 0) == -1) {
      mp::throw_errno("set OMPI_MCA_ess_singleton_isolated");
    }
    check(MPI_Init(&argc, &argv), "initialize MPI");
    check(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN),
          "make MPI calls return their errors");
    check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "read this process's rank");
    check(MPI_Comm_size(MPI_COMM_WORLD, &size_), "read the number of ranks");
  }
  ~Session() { MPI_Finalize(); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

 private:
  int rank_ = 0;
  int size_ = 1;
};

// MPI counts bytes in int: a buffer over 2 GiB - 1 needs another design (several rounds).
int as_count(std::size_t n, std::string_view what) {
  if (n > static_cast<std::size_t>(INT_MAX)) {
    throw std::length_error(fmt::format("cannot {}: {} bytes exceed MPI's int counts", what, n));
  }
  return static_cast<int>(n);
}

// Offsets of consecutive blocks of the given sizes, for the *v collectives.
std::vector<int> displacements(const std::vector<int>& sizes, std::string_view what) {
  std::vector<int> at(sizes.size());
  std::size_t sum = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    at[i] = as_count(sum, what);
    sum += static_cast<std::size_t>(sizes[i]);
  }
  as_count(sum, what);
  return at;
}

// Counts travel as bytes: per word, [u32 length][the word][u64 count].
void encode_into(const std::string& word, std::uint64_t n, std::string& out) {
  auto len = static_cast<std::uint32_t>(word.size());
  out.append(reinterpret_cast<const char*>(&len), sizeof len);
  out += word;
  out.append(reinterpret_cast<const char*>(&n), sizeof n);
}

template <class Each>
void decode(std::string_view bytes, Each each) {
  std::size_t at = 0;
  auto take = [&](void* dst, std::size_t n) {
    if (bytes.size() - at < n) throw std::runtime_error("cannot decode counts: truncated");
    std::memcpy(dst, bytes.data() + at, n);
    at += n;
  };
  while (at < bytes.size()) {
    std::uint32_t len = 0;
    std::uint64_t n = 0;
    take(&len, sizeof len);
    if (bytes.size() - at < len) throw std::runtime_error("cannot decode counts: truncated");
    std::string word(bytes.substr(at, len));
    at += len;
    take(&n, sizeof n);
    each(std::move(word), n);
  }
}

double ms_since(Clock::time_point t0) { return lesson::seconds_since(t0) * 1e3; }

// What each rank did, gathered by rank 0 for the report.
struct RankReport {
  char host[MPI_MAX_PROCESSOR_NAME];
  std::uint64_t piece_bytes;
  std::uint64_t words_mapped;  // words in its piece
  std::uint64_t shuffle_sent;  // bytes it sent to other ranks in the shuffle
  std::uint64_t words_owned;   // distinct words it reduced
  std::uint64_t misplaced;     // words it received that another rank owns (0)
  double map_ms, shuffle_ms, reduce_ms;
};

// The facts rank 0 reports.
struct Outcome {
  std::string error;  // from reading the input; the same on every rank
  wordcount::Text text;
  wordcount::Counts counts;       // gathered from every rank
  std::vector<RankReport> ranks;  // rank 0 only
  std::uint64_t duplicates = 0;   // words gathered from more than one rank (0)
  double read_ms = 0, scatter_ms = 0, gather_ms = 0, total_ms = 0;
};

// The whole map-reduce. Every rank calls it; the collectives pair them up.
Outcome mapreduce(const Session& mpi, const std::string& input) {
  Outcome out;
  int n = mpi.size();
  auto t0 = Clock::now();

  // Step 1: rank 0 reads the text and cuts it at whitespace into one piece per rank; every
  // rank learns whether that worked, so that a missing file ends all of them cleanly.
  std::vector<int> piece_sizes(static_cast<std::size_t>(n), 0);
  if (mpi.rank() == 0) {
    try {
      out.text = wordcount::read_input(input);
      auto pieces = wordcount::split(out.text.bytes, static_cast<std::size_t>(n));
      for (std::size_t i = 0; i < pieces.size(); ++i)  // fewer pieces than ranks: some get none
        piece_sizes[i] = as_count(pieces[i].second - pieces[i].first, "scatter the text");
      displacements(piece_sizes, "scatter the text");
    } catch (const std::exception& e) {
      out.error = e.what();
    }
    out.read_ms = ms_since(t0);
  }
  int error_len = static_cast<int>(out.error.size());
  check(MPI_Bcast(&error_len, 1, MPI_INT, 0, MPI_COMM_WORLD), "broadcast the read status");
  out.error.resize(static_cast<std::size_t>(error_len));
  check(MPI_Bcast(out.error.data(), error_len, MPI_CHAR, 0, MPI_COMM_WORLD),
        "broadcast the read error");
  if (!out.error.empty()) return out;

  // Step 2: scatter. Each rank receives its piece's size, then its bytes.
  auto t_scatter = Clock::now();
  int my_size = 0;
  check(MPI_Scatter(piece_sizes.data(), 1, MPI_INT, &my_size, 1, MPI_INT, 0, MPI_COMM_WORLD),
        "scatter the piece sizes");
  std::string piece(static_cast<std::size_t>(my_size), '\0');
  std::vector<int> piece_at =
      mpi.rank() == 0 ? displacements(piece_sizes, "scatter the text") : std::vector<int>{};
  check(MPI_Scatterv(out.text.bytes.data(), piece_sizes.data(), piece_at.data(), MPI_CHAR,
                     piece.data(), my_size, MPI_CHAR, 0, MPI_COMM_WORLD),
        "scatter the text");
  out.scatter_ms = ms_since(t_scatter);

  // Step 3: map. Count the words of this rank's piece.
  RankReport me{};
  int host_len = 0;
  check(MPI_Get_processor_name(me.host, &host_len), "read the host name");
  me.piece_bytes = piece.size();
  auto t_map = Clock::now();
  wordcount::Counts local = wordcount::count(piece);
  me.words_mapped = wordcount::total(local);
  me.map_ms = ms_since(t_map);

  // Step 4: shuffle. Bucket r holds the counts of the words rank r owns; one all-to-all
  // exchange of sizes, then one of bytes, delivers every bucket to its owner.
  auto t_shuffle = Clock::now();
  std::vector<std::string> buckets(static_cast<std::size_t>(n));
  for (const auto& [word, count] : local)
    encode_into(word, count, buckets[wordcount::partition_of(word, static_cast<std::size_t>(n))]);
  std::string send;
  std::vector<int> send_sizes;
  for (int r = 0; r < n; ++r) {
    send += buckets[static_cast<std::size_t>(r)];
    send_sizes.push_back(as_count(buckets[static_cast<std::size_t>(r)].size(), "shuffle"));
    if (r != mpi.rank()) me.shuffle_sent += buckets[static_cast<std::size_t>(r)].size();
  }
  std::vector<int> recv_sizes(static_cast<std::size_t>(n));
  check(MPI_Alltoall(send_sizes.data(), 1, MPI_INT, recv_sizes.data(), 1, MPI_INT, MPI_COMM_WORLD),
        "exchange the bucket sizes");
  std::vector<int> send_at = displacements(send_sizes, "shuffle");
  std::vector<int> recv_at = displacements(recv_sizes, "shuffle");
  std::string received(
      static_cast<std::size_t>(recv_at.back()) + static_cast<std::size_t>(recv_sizes.back()), '\0');
  check(MPI_Alltoallv(send.data(), send_sizes.data(), send_at.data(), MPI_CHAR, received.data(),
                      recv_sizes.data(), recv_at.data(), MPI_CHAR, MPI_COMM_WORLD),
        "shuffle the counts");
  me.shuffle_ms = ms_since(t_shuffle);

  // Step 5: reduce. Add up the counts of the words this rank owns.
  auto t_reduce = Clock::now();
  wordcount::Counts owned;
  decode(received, [&](std::string word, std::uint64_t count) {
    if (wordcount::partition_of(word, static_cast<std::size_t>(n)) !=
        static_cast<std::size_t>(mpi.rank()))
      ++me.misplaced;
    owned[std::move(word)] += count;
  });
  me.words_owned = owned.size();
  me.reduce_ms = ms_since(t_reduce);

  // Step 6: gather the disjoint results, and the reports, at rank 0.
  auto t_gather = Clock::now();
  std::string mine;
  for (const auto& [word, count] : owned) encode_into(word, count, mine);
  int mine_size = as_count(mine.size(), "gather the counts");
  std::vector<int> sizes(mpi.rank() == 0 ? static_cast<std::size_t>(n) : 0);
  check(MPI_Gather(&mine_size, 1, MPI_INT, sizes.data(), 1, MPI_INT, 0, MPI_COMM_WORLD),
        "gather the result sizes");
  std::vector<int> at =
      mpi.rank() == 0 ? displacements(sizes, "gather the counts") : std::vector<int>{};
  std::string all(mpi.rank() == 0 ? static_cast<std::size_t>(at.back() + sizes.back()) : 0, '\0');
  check(MPI_Gatherv(mine.data(), mine_size, MPI_CHAR, all.data(), sizes.data(), at.data(), MPI_CHAR,
                    0, MPI_COMM_WORLD),
        "gather the counts");
  out.ranks.resize(mpi.rank() == 0 ? static_cast<std::size_t>(n) : 0);
  check(MPI_Gather(&me, sizeof me, MPI_BYTE, out.ranks.data(), sizeof me, MPI_BYTE, 0,
                   MPI_COMM_WORLD),
        "gather the rank reports");
  if (mpi.rank() == 0) {
    decode(all, [&](std::string word, std::uint64_t count) {
      auto [it, fresh] = out.counts.emplace(std::move(word), count);
      if (!fresh) {  // two ranks reduced the same word: the partition would be broken
        ++out.duplicates;
        it->second += count;
      }
    });
  }
  out.gather_ms = ms_since(t_gather);
  out.total_ms = ms_since(t0);
  return out;
}

// Every count, one "word<TAB>count" line each, sorted by word: for diffing with another run.
void write_counts(const std::string& path, const wordcount::Counts& counts) {
  std::map<std::string, std::uint64_t> sorted(counts.begin(), counts.end());
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error(fmt::format("cannot write {}: cannot open it", path));
  for (const auto& [word, count] : sorted) f << word << '\t' << count << '\n';
  f.flush();
  if (!f) throw std::runtime_error(fmt::format("cannot write {}", path));
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "The word count over MPI ranks on one machine or several: scatter, map, "
                   "shuffle, gather."};
  std::string input = wordcount::kDefaultInput;
  std::size_t top_n = 10;
  std::string out_file;
  L.cli()
      .add_option("--input", input, "a file, or a folder read recursively")
      ->capture_default_str();
  L.cli()
      .add_option("--top", top_n, "how many of the most frequent words to show")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  L.cli().add_option("--out", out_file, "write every count to this file (rank 0)");
  L.parse(argc, argv);  // every rank parses the same arguments; --help and errors end it here

  Session mpi{argc, argv};

  // Ranks other than 0 take part in every collective and report nothing themselves. An
  // unexpected error in any rank ends the whole job (MPI_Abort): the others would wait for
  // it in the next collective for ever.
  if (mpi.rank() != 0) {
    try {
      return mapreduce(mpi, input).error.empty() ? 0 : 1;
    } catch (const std::exception& e) {
      fmt::print(stderr, "error: rank {}: {}\n", mpi.rank(), e.what());
      MPI_Abort(MPI_COMM_WORLD, 1);
      return 1;
    }
  }

  return L.run([&] {
    Outcome r;
    try {
      r = mapreduce(mpi, input);
    } catch (const std::exception& e) {
      fmt::print(stderr, "error: rank 0: {}\n", e.what());
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    if (!r.error.empty()) throw std::runtime_error(r.error);
    L.say("{} rank{} ({}), input {}: {} files, {} bytes", mpi.size(), mpi.size() == 1 ? "" : "s",
          under_mpirun() ? "started by mpirun" : "no mpirun: a single rank", input, r.text.files,
          r.text.bytes.size());

    // What each rank did: the bytes are split evenly, the words by hash.
    L.step("map, shuffle, reduce: what each rank did");
    L.say("  {:>4}  {:<16} {:>10} {:>10} {:>12} {:>10} {:>8} {:>8}", "rank", "host", "bytes",
          "words", "sent (B)", "owned", "map ms", "shuf ms");
    nlohmann::json per_rank = nlohmann::json::array();
    std::uint64_t owned_sum = 0, misplaced = 0;
    for (std::size_t i = 0; i < r.ranks.size(); ++i) {
      const RankReport& k = r.ranks[i];
      L.say("  {:>4}  {:<16} {:>10} {:>10} {:>12} {:>10} {:>8.2f} {:>8.2f}", i, k.host,
            k.piece_bytes, k.words_mapped, k.shuffle_sent, k.words_owned, k.map_ms, k.shuffle_ms);
      owned_sum += k.words_owned;
      misplaced += k.misplaced;
      per_rank.push_back({{"rank", i},
                          {"host", k.host},
                          {"piece_bytes", k.piece_bytes},
                          {"words_mapped", k.words_mapped},
                          {"shuffle_bytes_sent", k.shuffle_sent},
                          {"words_owned", k.words_owned},
                          {"map_ms", k.map_ms},
                          {"shuffle_ms", k.shuffle_ms},
                          {"reduce_ms", k.reduce_ms}});
    }
    L.say("read {:.2f} ms, scatter {:.2f} ms, gather {:.2f} ms; all steps {:.2f} ms", r.read_ms,
          r.scatter_ms, r.gather_ms, r.total_ms);

    // The check: the same text counted by one process.
    L.step("check against a serial count on rank 0");
    auto t_serial = Clock::now();
    wordcount::Counts serial = wordcount::count(r.text.bytes);
    double serial_ms = ms_since(t_serial);
    bool matches = r.counts == serial;
    bool disjoint = r.duplicates == 0 && misplaced == 0 && owned_sum == r.counts.size();
    L.say("serial count {:.2f} ms; {} words, {} distinct; equal to the gathered counts: {}",
          serial_ms, wordcount::total(serial), serial.size(), matches);
    L.say("every word was reduced by exactly one rank: {}", disjoint);

    L.step(fmt::format("the {} most frequent words", top_n));
    auto top = wordcount::top(r.counts, top_n);
    for (const auto& [word, count] : top) L.say("  {:>8}  {}", count, word);
    if (!out_file.empty()) {
      write_counts(out_file, r.counts);
      L.say("every count written to {}", out_file);
    }

    L.fact("ranks", mpi.size());
    L.fact("under_mpirun", under_mpirun());
    L.fact("input", input);
    L.fact("files", r.text.files);
    L.fact("bytes", r.text.bytes.size());
    L.fact("total_words", wordcount::total(r.counts));
    L.fact("distinct_words", r.counts.size());
    L.fact("top", top);
    L.fact("matches_serial", matches);
    L.fact("words_reduced_once", disjoint);
    L.fact("per_rank", per_rank);
    L.fact("read_ms", r.read_ms);
    L.fact("scatter_ms", r.scatter_ms);
    L.fact("gather_ms", r.gather_ms);
    L.fact("total_ms", r.total_ms);
    L.fact("serial_ms", serial_ms);
    if (!out_file.empty()) L.fact("out", out_file);
    return matches && disjoint;
  });
}
