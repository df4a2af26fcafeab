// starmap_async.cpp - starmap and starmap_async: a function of several arguments over a list.
//
// map() passes each item as one argument; starmap() unpacks each item - a std::tuple, a
// std::pair or a std::array - into several, like Python's pool.starmap(f, zip(a, b)).
// starmap_async() returns at once with an AsyncResult; its callback receives the whole
// list of results, or its error_callback the first failure, and get() raises that failure
// too.
//
// Usage: starmap_async [--workers N] [--items N] [--json]
//   $ build/3_pools/starmap_async --workers 2 --items 8
//
// Watch for: the zipped pairs give the same powers as a serial loop; strings and vectors
// travel as arguments and results; the main thread goes on while starmap_async runs; a
// negative exponent arrives at the error_callback as a RemoteError naming
// std::domain_error.
#include <fmt/ranges.h>

#include <array>
#include <atomic>
#include <mp/pool.hpp>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "lesson.hpp"

namespace {

long power(int base, int exponent) {
  if (exponent < 0)
    throw std::domain_error(fmt::format("{}^{} is not a whole number", base, exponent));
  long r = 1;
  for (int i = 0; i < exponent; ++i) r *= base;
  return r;
}

// A Caesar cipher: each letter moved `by` places along the alphabet.
std::string shift(std::string text, int by) {
  for (char& c : text) {
    if (c >= 'a' && c <= 'z') c = static_cast<char>('a' + ((c - 'a' + by) % 26 + 26) % 26);
  }
  return text;
}

double weighted_sum(std::vector<double> values, double weight) {
  return std::accumulate(values.begin(), values.end(), 0.0) * weight;
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "starmap and starmap_async: a function of several arguments over a list."};
  int& workers = L.add_workers(2, 64);
  int& items = L.add_items(8, 1, 100'000);
  L.parse(argc, argv);

  return L.run([&] {
    mp::Pool pool{workers};

    // Step 1: zip two lists into pairs and unpack each pair into power(base, exponent).
    L.step("starmap over zipped lists");
    std::vector<int> bases, exponents;
    for (int i = 0; i < items; ++i) {
      bases.push_back(2 + i % 5);
      exponents.push_back(i % 12);
    }
    std::vector<std::pair<int, int>> zipped;
    for (int i = 0; i < items; ++i) zipped.emplace_back(bases[i], exponents[i]);
    auto powers = pool.starmap(power, zipped);
    bool powers_match = true;
    for (int i = 0; i < items; ++i)
      powers_match = powers_match && powers[i] == power(bases[i], exponents[i]);
    L.say("bases     {}\nexponents {}\npowers    {}", bases, exponents, powers);
    // A tuple may hold anything serializable, a vector for instance.
    std::vector<std::tuple<std::vector<double>, double>> sums{{{1, 2, 3}, 0.5}, {{10}, 2}};
    auto weighted = pool.starmap(weighted_sum, sums);
    L.say("weighted sums: {}", weighted);

    // Step 2: starmap_async - submit, do something else, then collect through a callback.
    L.step("starmap_async with a callback");
    std::vector<std::tuple<std::string, int>> messages;
    for (int i = 0; i < items; ++i)
      messages.emplace_back(fmt::format("message number {}", i), i % 26);
    std::atomic<int> callback_calls{0};
    std::size_t callback_size = 0;
    auto encoded = pool.starmap_async(shift, messages, 0, [&](const std::vector<std::string>& r) {
      callback_size = r.size();
      callback_calls++;
    });
    // The main thread is free meanwhile: it works out the expected answer itself.
    std::vector<std::string> expected;
    for (const auto& [text, by] : messages) expected.push_back(shift(text, by));
    bool ready_after_own_work = encoded.ready();
    auto secret = encoded.get();
    bool secret_ok = secret == expected;
    std::vector<std::tuple<std::string, int>> back;
    for (int i = 0; i < items; ++i) back.emplace_back(secret[i], -(i % 26));
    auto decoded = pool.starmap(shift, back);
    bool roundtrip = true;
    for (int i = 0; i < items; ++i) roundtrip = roundtrip && decoded[i] == std::get<0>(messages[i]);
    L.say("'{}' -> '{}' -> '{}'", std::get<0>(messages.back()), secret.back(), decoded.back());
    L.say(
        "the callback got {} results in {} call; equal to the main thread's own: {} "
        "(ready before main finished its share: {})",
        callback_size, callback_calls.load(), secret_ok, ready_after_own_work);

    // Step 3: one bad tuple: the error callback gets it, and get() raises it.
    L.step("starmap_async with a bad tuple");
    auto bad = zipped;
    bad[bad.size() / 2] = {3, -1};
    std::atomic<int> error_calls{0};
    std::string error_type;
    auto failing = pool.starmap_async(power, bad, 0, {}, [&](const std::exception& e) {
      if (auto* remote = dynamic_cast<const mp::RemoteError*>(&e)) error_type = remote->type_name();
      error_calls++;
      L.say("error_callback: {}", e.what());
    });
    failing.wait();
    bool get_raised = false;
    try {
      failing.get();
    } catch (const mp::RemoteError& e) {
      get_raised = e.type_name() == error_type;
    }
    pool.close();
    pool.join();

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("powers_match", powers_match);
    L.fact("weighted_sums", weighted);
    L.fact("cipher_roundtrip", roundtrip);
    L.fact("ciphers_match_serial", secret_ok);
    L.fact("callback_calls", callback_calls.load());
    L.fact("callback_results", callback_size);
    L.fact("error_callback_calls", error_calls.load());
    L.fact("error_type", error_type);
    L.fact("get_raised_same_error", get_raised);
    return powers_match && roundtrip && secret_ok && callback_calls.load() == 1 &&
           callback_size == static_cast<std::size_t>(items) && error_calls.load() == 1 &&
           error_type == "std::domain_error" && get_raised &&
           weighted == std::vector<double>{3.0, 20.0};
  });
}
