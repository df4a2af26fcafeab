// manager_dict_list.cpp - A Manager's dict and list: lost updates, the atomic fix, a keyed client.
//
// mp::Manager starts a server process that holds the objects; workers reach them through
// proxies, and every call (set, get, append...) is one atomic request. A sequence of calls
// is not atomic: read-then-write from several processes loses updates, as `d[k] += 1` does
// in Python. dict.update_with(key, fn) runs fn inside the server in one step, so nothing is
// lost. Last, a manager on TCP is reached by another process with the right authkey, and
// refused (AuthenticationError) with a wrong one.
//
// Usage: manager_dict_list [--workers N] [--items N] [--json]
//   $ build/2_communication/manager_dict_list --workers 4 --items 500
//
// Watch for: the racy counter ends below workers x items (by how much varies from run to
// run, and may be zero on a quiet machine); the update_with counter and the list are exact;
// the wrong key is refused while the server goes on serving.
#include <fmt/ranges.h>
#include <unistd.h>

#include <chrono>
#include <mp/manager.hpp>
#include <mp/process.hpp>
#include <string>
#include <vector>

#include "lesson.hpp"

namespace {

using Dict = mp::DictProxy<std::string, long>;

long add_one(long v) { return v + 1; }

// Each worker signs in, then counts `items` times two ways and logs its work in the list.
void worker(Dict d, mp::ListProxy<std::string> log, int id, int items) {
  d.set(fmt::format("worker-{}", id), ::getpid());
  for (int i = 0; i < items; ++i) {
    long seen = d.get("racy", 0);         // read...
    d.set("racy", seen + 1);              // ...then write: another worker may have written between
    d.update_with("atomic", add_one, 0);  // one request: read, add and write in the server
    log.append(fmt::format("w{}:{}", id, i));
  }
}

// A client in another process, as on another machine: it knows only the address and the key.
int remote_client(std::string address, std::string authkey) {
  try {
    auto board = mp::connect(address, authkey).dict<std::string, std::string>("board");
    board.set("reply", fmt::format("hello back from pid {}", ::getpid()));
    return 0;  // connected
  } catch (const mp::AuthenticationError&) {
    return 7;  // refused
  }
}

}  // namespace

int main(int argc, char** argv) {
  lesson::Lesson L{MP_LESSON_ID,
                   "A Manager's dict and list: lost updates, the atomic fix, a keyed client."};
  int& workers = L.add_workers(4, 64);
  int& items = L.add_items(500, 1, 100'000);
  L.parse(argc, argv);

  return L.run([&] {
    // Step 1: a manager (a server process on a private Unix socket) and two objects in it.
    L.step("a Manager and its objects");
    mp::Manager manager;
    auto d = manager.dict<std::string, long>();
    auto log = manager.list<std::string>();
    L.say("server pid {} at {}", manager.pid(), manager.address());

    // Step 2: workers share them. Proxies are copied into each child like any argument.
    L.step(fmt::format("{} workers x {} increments, racy and atomic", workers, items));
    auto start = std::chrono::steady_clock::now();
    std::vector<mp::Process> ps;
    for (int w = 0; w < workers; ++w) ps.emplace_back(worker, d, log, w, items);
    for (auto& p : ps) p.start();
    for (auto& p : ps) p.join();
    double seconds = lesson::seconds_since(start);
    long expected = static_cast<long>(workers) * items;
    long racy = d.get("racy", 0);
    long atomic = d.get("atomic", 0);
    std::size_t logged = log.size();
    int signed_in = 0;
    for (const auto& [key, pid] : d.items()) signed_in += key.starts_with("worker-") ? 1 : 0;
    L.say("workers signed in: {}", signed_in);
    L.say("read-then-write counter: {} of {} ({} updates lost)", racy, expected, expected - racy);
    L.say("update_with counter:     {} of {}", atomic, expected);
    L.say("list entries:            {} of {}, first {}", logged, expected, log.get(0));
    L.say("{} manager calls in {:.2f} s, from {} processes at once", expected * 4, seconds,
          workers);

    // Step 3: a manager on TCP, for clients that are not our children.
    L.step("a manager on TCP with an authkey");
    mp::Manager remote("tcp:127.0.0.1:0", "playground-key");
    auto board = remote.dict<std::string, std::string>("board");
    board.set("greeting", "hello");
    L.say("listening on {}", remote.address());
    mp::Process good{remote_client, remote.address(), std::string("playground-key")};
    mp::Process bad{remote_client, remote.address(), std::string("a wrong key")};
    good.start();
    good.join();
    bad.start();
    bad.join();
    bool replied = board.contains("reply");
    L.say("right key: exit {}, the board now says '{}'", *good.exitcode(),
          board.get("reply", "(nothing)"));
    L.say("wrong key: exit {} ({})", *bad.exitcode(),
          *bad.exitcode() == 7 ? "AuthenticationError" : "not refused!");
    board.set("after", "still serving");
    bool still_serving = board.get("after") == "still serving";

    // Step 4: shutting down removes the server and its socket directory.
    std::string dir = manager.address().substr(5, manager.address().rfind('/') - 5);
    pid_t server = manager.pid();
    manager.shutdown();
    remote.shutdown();
    bool socket_removed = ::access(dir.c_str(), F_OK) != 0;
    L.say("\nserver {} stopped; socket directory {} removed: {}", server, dir, socket_removed);

    L.fact("workers", workers);
    L.fact("items", items);
    L.fact("expected", expected);
    L.fact("signed_in", signed_in);
    L.fact("racy_count", racy);  // reported, not claimed: the race decides
    L.fact("lost_updates", expected - racy);
    L.fact("atomic_count", atomic);
    L.fact("list_size", logged);
    L.fact("remote_right_key_exitcode", *good.exitcode());
    L.fact("remote_replied", replied);
    L.fact("remote_wrong_key_refused", *bad.exitcode() == 7);
    L.fact("served_after_wrong_key", still_serving);
    L.fact("socket_removed", socket_removed);
    return signed_in == workers && atomic == expected && logged == std::size_t(expected) &&
           racy <= expected && *good.exitcode() == 0 && replied && *bad.exitcode() == 7 &&
           still_serving && socket_removed;
  });
}
