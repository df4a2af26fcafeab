// fuzz/fuzz_manager_frames.cpp - libFuzzer target: the manager server's frame parser and
// request handler, fed arbitrary bytes as if a client had sent them on its socket.
//
// Each input is split in two at a point chosen by its first byte (so frames arrive torn),
// fed to a FrameReader, and every whole frame is handled by a fresh server state, exactly as
// the server's connection loop does. Malformed input must end in ProtocolError (the server
// closes that connection); nothing may crash, hang, leak, or allocate without bound.
// Update functions are disabled here (they are code addresses: see mp/manager.hpp) and
// waits return at once (no peer to wait for).
#include <cstddef>
#include <cstdint>
#include <mp/manager.hpp>
#include <string>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  std::size_t cut = data[0] % (bytes.size() + 1);
  auto state = mp::detail::make_server_state(false);
  mp::detail::Peer peer;  // no liveness check: waits end at once
  mp::detail::FrameReader reader(1 << 20);
  std::string frame, answer;
  try {
    for (std::string_view part : {bytes.substr(0, cut), bytes.substr(cut)}) {
      reader.feed(part);
      while (reader.next(frame)) {
        if (!mp::detail::handle_request(*state, peer, frame, answer)) return 0;  // shutdown
        if (answer.empty()) __builtin_trap();  // every request gets an answer
      }
    }
  } catch (const mp::detail::ProtocolError&) {
    // Rejected: the server closes this connection.
  }
  return 0;
}
