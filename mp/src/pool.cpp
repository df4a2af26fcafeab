// mp/src/pool.cpp - the Pool engine: worker processes, rings in shared memory, the service
// thread that dispatches, collects, replaces and cancels.
//
// Shared memory (one memfd Region per pool): a header with the service thread's "parked"
// flag, then one slot per worker place (2 x processes, so that a retiring worker and its
// replacement can overlap), each with the id of the task its worker is running and two
// single-producer single-consumer byte rings: the inbox (service thread -> worker, task
// frames) and the outbox (worker -> service thread, result frames).
//
// The crash-safety argument. The service thread assigns each chunk to one worker and
// remembers, per worker, the chunks it sent in order (ids increase). A worker runs its
// chunks one at a time in that order; before it runs one it stores the chunk's id in its
// slot (`running`), and it writes the whole result frame before it looks at the next
// chunk. When the worker is gone (its pidfd is readable), the service thread first reads
// every complete result left in the outbox. Then, for each chunk still unanswered: if its
// id <= running, the worker had started it - it fails with WorkerLostError (never re-run:
// it may have had effects); otherwise the worker never started it - it goes to another
// worker. Every chunk is therefore answered exactly once, by a result or by an error.
#include "mp/pool.hpp"

#include <cxxabi.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <typeinfo>

#include "mp/detail/fd.hpp"
#include "mp/detail/fork_gate.hpp"
#include "mp/detail/futex.hpp"
#include "mp/detail/region.hpp"

namespace mp {
namespace detail {

// ---- jobs -------------------------------------------------------------------------------

std::string JobBase::describe(std::size_t first, std::size_t count) const {
  if (std::string_view(kind) == "apply") return "an apply task";
  if (count == 1) return fmt::format("task {} of {}", first, kind);
  return fmt::format("tasks {}..{} of {}", first, first + count - 1, kind);
}

void JobBase::deliver(std::size_t first, std::size_t count, std::string_view payload, pid_t pid) {
  {
    std::lock_guard lock(mutex_);
    std::size_t pos = 0;
    for (std::size_t k = 0; k < count; ++k) {
      constexpr std::size_t kItemHeader = 1 + sizeof(std::uint32_t);
      std::uint32_t len = 0;
      if (payload.size() - pos >= kItemHeader) {
        std::memcpy(&len, payload.data() + pos + 1, sizeof len);
      }
      if (payload.size() - pos < kItemHeader || len > payload.size() - pos - kItemHeader) {
        auto e = std::make_exception_ptr(
            SerializationError(fmt::format("cannot decode the result of {}: the result frame "
                                           "from worker {} is truncated",
                                           describe(first + k, 1), pid)));
        for (; k < count; ++k) set_error(first + k, e);
        break;
      }
      char status = payload[pos];
      std::string_view bytes = payload.substr(pos + kItemHeader, len);
      pos += kItemHeader + len;
      try {
        if (status == 0) {
          set_value(first + k, bytes);
        } else {
          auto [type, message] = loads<std::string, std::string>(bytes);
          set_error(first + k, std::make_exception_ptr(RemoteError(type, message, pid)));
        }
      } catch (...) {
        set_error(first + k, std::current_exception());
      }
    }
  }
  cv_.notify_all();
}

void JobBase::fail(std::size_t first, std::size_t count, const std::exception_ptr& error) {
  {
    std::lock_guard lock(mutex_);
    for (std::size_t k = 0; k < count; ++k) set_error(first + k, error);
  }
  cv_.notify_all();
}

namespace {

// ---- shared memory ----------------------------------------------------------------------

constexpr std::uint64_t kRingBytes = std::uint64_t{128} << 10;  // per direction, per slot
constexpr std::uint32_t kMagic = 0x6d70506c;                    // "mpPl"
constexpr std::uint32_t kSlotBooting = 1;
constexpr std::uint32_t kSlotReady = 2;

// Spins before sleeping: long enough to catch a peer that is about to answer, short
// enough not to steal a core from the workers on a small machine.
// (A few microseconds. Measured on a loaded 2-core machine: spinning 10x longer made
// map(chunksize=1) 3-6x slower, since a spinning thread takes the core a worker needs.)
constexpr int kWorkerSpin = 128;
constexpr int kServiceSpin = 128;
// How much work (in time) the service thread queues in each worker's inbox: enough to
// keep it busy while the service thread sleeps, little enough to keep the load balanced.
constexpr double kQueuedNs = 200'000;
constexpr std::size_t kMaxDepth = 64;
// While busy, the service thread looks for dead workers this often (when idle, it sleeps
// in poll() on their pidfds and learns at once).
constexpr auto kDeathCheck = std::chrono::milliseconds(2);
// A worker with more tasks queued does not wake the service thread for each result (see
// Worker::ring_parent); if its next task is long, a finished result would wait for it. So
// while tasks are in flight the service thread sleeps at most this long.
constexpr int kInFlightPollMs = 5;
// Attempts per worker in the constructor: a start killed once (during the spawn or
// forkserver handshake) is replaced; three failures in a row are a real error.
constexpr int kConstructorStartTries = 3;
// terminate(): SIGTERM, then SIGKILL for workers still alive after this.
constexpr auto kTerminateGrace = std::chrono::milliseconds(300);

struct alignas(64) RingCtl {
  alignas(64) std::atomic<std::uint64_t> tail{0};  // bytes written, by the producer
  alignas(64) std::atomic<std::uint64_t> head{0};  // bytes read, by the consumer
};

struct alignas(64) SlotShared {
  alignas(64) std::atomic<std::uint64_t> running{0};    // id of the last task started
  std::atomic<std::uint32_t> state{0};                  // kSlotBooting, kSlotReady
  std::atomic<std::uint32_t> low_water{0};              // see Worker::ring_parent
  alignas(64) std::atomic<std::uint32_t> sleeping{0};   // futex: the worker sleeps on it
  alignas(64) std::atomic<std::uint64_t> frames_in{0};  // inbox frames completely written
  RingCtl inbox;
  RingCtl outbox;
};

struct alignas(64) PoolHeader {
  std::uint32_t magic = kMagic;
  std::uint32_t slots = 0;
  std::uint64_t ring_bytes = 0;
  alignas(64) std::atomic<std::uint32_t> parked{0};  // the service thread sleeps in poll()
};

constexpr std::size_t align_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }
constexpr std::size_t kSlotsOffset = align_up(sizeof(PoolHeader), 64);
std::size_t data_offset(std::size_t slots) {
  return align_up(kSlotsOffset + slots * sizeof(SlotShared), 4096);
}

// A process's view of one ring. Only one producer and one consumer ever use it.
struct Ring {
  RingCtl* ctl = nullptr;
  char* data = nullptr;
  std::uint64_t cap = 0;

  std::uint64_t used() const noexcept {
    return ctl->tail.load(std::memory_order_acquire) - ctl->head.load(std::memory_order_acquire);
  }
  std::uint64_t available() const noexcept { return used(); }
  std::uint64_t free_space() const noexcept { return cap - used(); }

  // Producer: writes what fits of [p, p + n) and publishes it. Returns the bytes written.
  std::size_t write(const char* p, std::size_t n) noexcept {
    std::uint64_t t = ctl->tail.load(std::memory_order_relaxed);
    std::uint64_t h = ctl->head.load(std::memory_order_acquire);
    std::size_t room = static_cast<std::size_t>(cap - (t - h));
    n = std::min(n, room);
    if (n == 0) return 0;
    std::size_t at = static_cast<std::size_t>(t & (cap - 1));
    std::size_t first = std::min(n, static_cast<std::size_t>(cap) - at);
    std::memcpy(data + at, p, first);
    std::memcpy(data, p + first, n - first);
    ctl->tail.store(t + n, std::memory_order_release);
    return n;
  }

  // Consumer: appends everything available (at most `max`) to dst. Returns the bytes read.
  std::size_t read(std::string& dst, std::size_t max = SIZE_MAX) {
    std::uint64_t h = ctl->head.load(std::memory_order_relaxed);
    std::uint64_t t = ctl->tail.load(std::memory_order_acquire);
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(t - h, max));
    if (n == 0) return 0;
    std::size_t at = static_cast<std::size_t>(h & (cap - 1));
    std::size_t first = std::min(n, static_cast<std::size_t>(cap) - at);
    std::size_t old = dst.size();
    dst.resize(old + n);
    std::memcpy(dst.data() + old, data + at, first);
    std::memcpy(dst.data() + old + first, data, n - first);
    ctl->head.store(h + n, std::memory_order_release);
    return n;
  }
};

struct Layout {
  char* base = nullptr;
  PoolHeader* header() const noexcept { return reinterpret_cast<PoolHeader*>(base); }
  SlotShared& slot(std::uint32_t i) const noexcept {
    return reinterpret_cast<SlotShared*>(base + kSlotsOffset)[i];
  }
  Ring inbox(std::uint32_t i) const noexcept {
    auto* h = header();
    return Ring{&slot(i).inbox, base + data_offset(h->slots) + 2 * i * h->ring_bytes,
                h->ring_bytes};
  }
  Ring outbox(std::uint32_t i) const noexcept {
    auto* h = header();
    return Ring{&slot(i).outbox, base + data_offset(h->slots) + (2 * i + 1) * h->ring_bytes,
                h->ring_bytes};
  }
};

// ---- frames -----------------------------------------------------------------------------

enum FrameKind : std::uint32_t {
  kTask = 1,       // -> worker: run `count` items with function `aux`; id = task id
  kDefine = 2,     // -> worker: function definitions, ids from `id`, `count` of them
  kStop = 3,       // -> worker: exit
  kResult = 11,    // <- worker: results of task `id`; aux = run time in ns
  kInitError = 12  // <- worker: the initializer threw (type, message)
};

struct FrameHeader {
  std::uint64_t size;  // the whole frame, this header included
  std::uint64_t id;
  std::uint64_t aux;
  std::uint32_t count;
  std::uint32_t kind;
};
static_assert(sizeof(FrameHeader) == 32);

constexpr std::uint64_t kMaxFrame = std::uint64_t{1} << 40;

void put_header(std::string& out, std::size_t at, const FrameHeader& h) {
  std::memcpy(out.data() + at, &h, sizeof h);
}

// A function as it travels: the trampoline and the target, as module-relative addresses.
struct FnWire {
  CodeAddress trampoline;
  CodeAddress target;
  bool has_target = false;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(trampoline, target, has_target);
  }
};

std::string current_exception_type() {
  const std::type_info* t = abi::__cxa_current_exception_type();
  if (!t) return "unknown exception";
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(
      abi::__cxa_demangle(t->name(), nullptr, nullptr, &status), std::free);
  return status == 0 && demangled ? demangled.get() : t->name();
}

// Inside a catch block: the exception's type name and message.
std::pair<std::string, std::string> describe_current_exception() {
  std::string type = current_exception_type();
  std::string message;
  try {
    throw;
  } catch (const std::exception& e) {
    message = e.what();
  } catch (...) {
  }
  return {type, message};
}

}  // namespace

// What a worker process starts with. Descriptors travel through the FdChannel for spawn
// and forkserver; under fork the numbers are inherited as they are.
struct WorkerBoot {
  int region_fd = -1;
  int bell_fd = -1;
  std::uint32_t slot = 0;
  std::uint32_t maxtasks = 0;
  bool has_init = false;
  CodeAddress init_trampoline;
  CodeAddress init_target;
  bool init_has_target = false;
  std::string init_args;
  std::vector<int> init_fds;

  template <class Archive>
  void save(Archive& ar) const {
    std::vector<std::uint32_t> fds;
    for (int fd : init_fds) fds.push_back(export_fd(fd));
    ar(export_fd(region_fd), export_fd(bell_fd), slot, maxtasks, has_init, init_trampoline,
       init_target, init_has_target, init_args, fds);
  }
  template <class Archive>
  void load(Archive& ar) {
    std::uint32_t region = 0, bell = 0;
    std::vector<std::uint32_t> fds;
    ar(region, bell, slot, maxtasks, has_init, init_trampoline, init_target, init_has_target,
       init_args, fds);
    region_fd = import_fd(region);
    bell_fd = import_fd(bell);
    init_fds.clear();
    for (auto i : fds) init_fds.push_back(import_fd(i));
  }
};

namespace {

// ---- the worker process -----------------------------------------------------------------

class Worker {
 public:
  explicit Worker(const WorkerBoot& boot)
      : boot_(boot), region_(Region::attach(boot.region_fd)), layout_{region_.as<char>()} {
    if (layout_.header()->magic != kMagic || boot.slot >= layout_.header()->slots) {
      throw std::runtime_error("cannot start a pool worker: the pool's shared memory is not valid");
    }
    slot_ = &layout_.slot(boot.slot);
    inbox_ = layout_.inbox(boot.slot);
    outbox_ = layout_.outbox(boot.slot);
  }

  int run() {
    if (boot_.has_init && !run_initializer()) return 1;
    slot_->state.store(kSlotReady, std::memory_order_release);
    for (;;) {
      FrameHeader h{};
      std::string_view payload = next_frame(h);
      if (h.size < sizeof(FrameHeader)) return 3;  // not a frame: the stream is corrupt
      ++frames_done_;
      switch (h.kind) {
        case kStop:
          return 0;
        case kDefine:
          define(h, payload);
          break;
        case kTask:
          run_task(h, payload);
          if (boot_.maxtasks != 0 && ++tasks_done_ >= boot_.maxtasks) return 0;
          break;
        default:
          return 3;
      }
    }
  }

 private:
  struct Fn {
    TaskTrampoline trampoline = nullptr;
    const void* target = nullptr;
    std::string error;
  };

  bool run_initializer() {
    try {
      auto tramp =
          reinterpret_cast<Trampoline>(const_cast<void*>(resolve_code(boot_.init_trampoline)));
      const void* target = boot_.init_has_target ? resolve_code(boot_.init_target) : nullptr;
      FdImport imported(boot_.init_fds);
      tramp(target, boot_.init_args);
      return true;
    } catch (...) {
      auto [type, message] = describe_current_exception();
      std::string out(sizeof(FrameHeader), '\0');
      dump_into(out, type, message);
      put_header(out, 0, FrameHeader{out.size(), 0, 0, 0, kInitError});
      write_all(out);
      ring_parent(true);
      return false;
    }
  }

  // The next complete frame from the inbox (waiting for it). The view stays valid until
  // the next call.
  std::string_view next_frame(FrameHeader& h) {
    in_pos_ += last_size_;
    last_size_ = 0;
    for (;;) {
      std::size_t have = in_.size() - in_pos_;
      if (have >= sizeof(FrameHeader)) {
        std::memcpy(&h, in_.data() + in_pos_, sizeof h);
        if (h.size < sizeof(FrameHeader) || h.size > kMaxFrame) {
          h.size = 0;
          return {};
        }
        if (have >= h.size) {
          last_size_ = static_cast<std::size_t>(h.size);
          return std::string_view(in_.data() + in_pos_ + sizeof h, h.size - sizeof h);
        }
      }
      if (in_pos_ > 0) {
        in_.erase(0, in_pos_);
        in_pos_ = 0;
      }
      if (inbox_.read(in_) == 0) {
        // Half a frame: the service thread has the rest and waits for room in the inbox.
        if (in_.size() > in_pos_) ring_parent(true);
        wait_until([&] { return inbox_.available() > 0; });
      }
    }
  }

  void define(const FrameHeader& h, std::string_view payload) {
    std::vector<FnWire> defs;
    try {
      defs = load<std::vector<FnWire>>(payload);
    } catch (const std::exception&) {
      return;  // tasks that use these ids will report that the function is unknown
    }
    std::size_t first = static_cast<std::size_t>(h.id);
    if (fns_.size() < first + defs.size()) fns_.resize(first + defs.size());
    for (std::size_t i = 0; i < defs.size(); ++i) {
      Fn& fn = fns_[first + i];
      try {
        fn.trampoline =
            reinterpret_cast<TaskTrampoline>(const_cast<void*>(resolve_code(defs[i].trampoline)));
        fn.target = defs[i].has_target ? resolve_code(defs[i].target) : nullptr;
      } catch (const std::exception& e) {
        fn.trampoline = nullptr;
        fn.error = e.what();
      }
    }
  }

  void run_task(const FrameHeader& h, std::string_view payload) {
    // Say which task runs before running it: if this process dies from here on, the pool
    // fails this task instead of running it again.
    slot_->running.store(h.id, std::memory_order_release);
    auto t0 = std::chrono::steady_clock::now();
    out_.assign(sizeof(FrameHeader), '\0');
    const Fn* fn = h.aux < fns_.size() ? &fns_[h.aux] : nullptr;
    std::size_t pos = 0;
    for (std::uint32_t k = 0; k < h.count; ++k) {
      std::uint32_t len = 0;
      std::string_view args;
      if (payload.size() - pos >= sizeof len) {
        std::memcpy(&len, payload.data() + pos, sizeof len);
        pos += sizeof len;
        if (len <= payload.size() - pos) args = payload.substr(pos, len);
        pos += std::min<std::size_t>(len, payload.size() - pos);
      }
      run_item(fn, args);
    }
    auto ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
            .count();
    put_header(out_, 0,
               FrameHeader{out_.size(), h.id, static_cast<std::uint64_t>(ns), h.count, kResult});
    write_all(out_);
    ring_parent(false);
  }

  // Appends [u8 status][u32 size][bytes]: the result, or (type, message) of the exception.
  void run_item(const Fn* fn, std::string_view args) {
    constexpr std::size_t kItemHeader = 1 + sizeof(std::uint32_t);
    std::size_t at = out_.size();
    out_.append(kItemHeader, '\0');
    char status = 0;
    if (!fn || !fn->trampoline) {
      status = 1;
      dump_into(out_, std::string("mp::ProcessError"),
                fmt::format("cannot run the task in worker {}: {}", ::getpid(),
                            fn ? fn->error : std::string("its function was never defined")));
    } else {
      try {
        fn->trampoline(fn->target, args, out_);
      } catch (...) {
        auto [type, message] = describe_current_exception();
        out_.resize(at + kItemHeader);
        status = 1;
        dump_into(out_, type, message);
      }
    }
    std::size_t size = out_.size() - at - kItemHeader;
    if (size > UINT32_MAX) {
      out_.resize(at + kItemHeader);
      status = 1;
      dump_into(out_, std::string("std::length_error"),
                std::string("cannot send the result back: it exceeds 4 GiB"));
      size = out_.size() - at - kItemHeader;
    }
    out_[at] = status;
    auto s32 = static_cast<std::uint32_t>(size);
    std::memcpy(out_.data() + at + 1, &s32, sizeof s32);
  }

  // Writes all of `bytes` to the outbox, waiting for room when it is full.
  void write_all(std::string_view bytes) {
    std::size_t off = 0;
    while (off < bytes.size()) {
      off += outbox_.write(bytes.data() + off, bytes.size() - off);
      if (off < bytes.size()) {
        ring_parent(true);
        wait_until([&] { return outbox_.free_space() > 0; });
      }
    }
  }

  // Wakes the service thread if it sleeps and has a reason to act: this worker is running
  // low on tasks (at most low_water queued), its outbox is filling up, or `force`.
  void ring_parent(bool force) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    auto& parked = layout_.header()->parked;
    if (parked.load(std::memory_order_relaxed) == 0) return;
    if (!force) {
      std::uint64_t queued = slot_->frames_in.load(std::memory_order_acquire) - frames_done_;
      if (queued > slot_->low_water.load(std::memory_order_relaxed) &&
          outbox_.used() < outbox_.cap / 2) {
        return;
      }
    }
    if (parked.exchange(0) == 0) return;
    std::uint64_t one = 1;
    // EAGAIN (counter full) cannot happen in practice and means the parent is awake anyway.
    retry_eintr([&] { return ::write(boot_.bell_fd, &one, sizeof one); });
  }

  // Spins, then sleeps on the slot's futex until ready() holds. The service thread clears
  // `sleeping` and wakes it after it writes to the inbox or reads from the outbox.
  template <class Ready>
  void wait_until(Ready ready) {
    for (int i = 0; i < kWorkerSpin; ++i) {
      if (ready()) return;
      cpu_relax();
    }
    for (;;) {
      slot_->sleeping.store(1, std::memory_order_seq_cst);
      if (ready()) {
        slot_->sleeping.store(0, std::memory_order_relaxed);
        return;
      }
      futex_wait(slot_->sleeping, 1, deadline_after(std::chrono::seconds(1)));
      if (ready()) {
        slot_->sleeping.store(0, std::memory_order_relaxed);
        return;
      }
    }
  }

  WorkerBoot boot_;
  Region region_;
  Layout layout_;
  SlotShared* slot_ = nullptr;
  Ring inbox_;
  Ring outbox_;
  std::string in_;
  std::size_t in_pos_ = 0;
  std::size_t last_size_ = 0;
  std::string out_;
  std::vector<Fn> fns_;
  std::uint64_t frames_done_ = 0;
  std::uint32_t tasks_done_ = 0;
};

}  // namespace

// The target of every worker process (a plain function, so spawn can find it again).
int pool_worker_main(WorkerBoot boot) {
  Worker worker(boot);
  return worker.run();
}

// ---- the engine, in the pool's process --------------------------------------------------

namespace {

struct InFlight {
  std::uint64_t id;
  std::shared_ptr<JobBase> job;
  std::size_t chunk;
};

struct WorkerRec {
  std::uint32_t slot = 0;
  Process proc;
  pid_t pid = 0;
  std::deque<InFlight> inflight;  // chunks sent and not answered, in the order sent
  std::string staged;             // frame bytes not yet written into the inbox
  std::size_t staged_pos = 0;
  std::uint64_t staged_frames = 0;
  std::uint64_t frames_sent = 0;  // frames completely written into the inbox
  std::string in;                 // outbox bytes read, not yet parsed
  std::size_t in_pos = 0;
  std::uint32_t known_fns = 0;
  std::uint32_t dispatched = 0;
  bool retiring = false;  // has its maxtasksperchild tasks: exits by itself
  bool stopping = false;  // was sent kStop
  bool bad = false;       // sent garbage: killed, waiting for its death
};

enum class PoolState { run, close, terminate };

}  // namespace

class PoolEngine {
 public:
  PoolEngine(int processes, Initializer initializer, int maxtasks, const Context& context)
      : initializer_(std::move(initializer)), context_(context) {
    if (processes < 0) {
      throw std::invalid_argument(fmt::format(
          "cannot create a pool of {} processes: the number must be at least 1 (0 means "
          "cpu_count())",
          processes));
    }
    if (processes > 4096) {
      throw std::invalid_argument(
          fmt::format("cannot create a pool of {} processes: at most 4096", processes));
    }
    if (maxtasks < 0) {
      throw std::invalid_argument(fmt::format(
          "cannot create a pool with maxtasksperchild {}: it must be at least 1 (0: no limit)",
          maxtasks));
    }
    processes_ = processes == 0 ? cpu_count() : processes;
    maxtasks_ = static_cast<std::uint32_t>(maxtasks);
    nslots_ = static_cast<std::uint32_t>(2 * processes_);
    std::string_view method = context_.start_method();
    prefix_ = method == "fork" ? "Fork" : method == "spawn" ? "Spawn" : "ForkServer";

    std::size_t bytes = data_offset(nslots_) + 2 * nslots_ * kRingBytes;
    region_ = Region::create(bytes, "mp-pool");
    layout_.base = region_.as<char>();
    auto* header = new (layout_.base) PoolHeader();
    header->slots = nslots_;
    header->ring_bytes = kRingBytes;
    for (std::uint32_t i = 0; i < nslots_; ++i) {
      new (&layout_.slot(i)) SlotShared();
    }
    bell_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!bell_) throw_errno("create the pool's eventfd");
    workers_.resize(nslots_);

    // The first workers start here, in the constructing thread, so that a failure is an
    // exception from the constructor. A start can fail once because the new worker was
    // killed during its start handshake (spawn, forkserver): that worker is replaced, as
    // one that dies later would be. A failure that repeats is the constructor's exception.
    try {
      for (std::uint32_t i = 0; i < static_cast<std::uint32_t>(processes_); ++i) {
        for (int attempt = 1;; ++attempt) {
          try {
            start_worker(i);
            break;
          } catch (const std::exception& e) {
            if (attempt == kConstructorStartTries) throw;
            report_noexcept(fmt::format("the pool replaces a worker that failed to start: {}",
                                        e.what()));
          }
        }
      }
      // Both threads allocate from their first instruction: they start inside busy spans
      // (a fork elsewhere waits for their safe points, mp/detail/fork_gate.hpp).
      service_ = start_busy_thread([this](BusySpan& span) { service_main(span); });
      callbacks_ = start_busy_thread([this](BusySpan& span) { callback_main(span); });
    } catch (...) {
      if (service_.joinable()) {  // it stops the workers itself
        {
          std::lock_guard lock(mutex_);
          state_ = PoolState::terminate;
          has_news_.store(true);
        }
        ring_service();
        service_.join();
      } else {
        kill_all_workers();
        drop_workers();
      }
      throw;
    }
  }

  ~PoolEngine() {
    try {
      terminate();
    } catch (const std::exception& e) {
      report_noexcept(e.what());
    }
  }

  // ---- called by user threads

  std::uint32_t function_id(const void* trampoline, const void* target) {
    std::lock_guard lock(mutex_);
    auto key = std::make_pair(trampoline, target);
    if (auto it = fn_ids_.find(key); it != fn_ids_.end()) return it->second;
    FnWire w;
    w.trampoline = locate_code(trampoline);
    if (target) {
      w.target = locate_code(target);
      w.has_target = true;
    }
    auto id = static_cast<std::uint32_t>(fns_.size());
    fns_.push_back(std::move(w));
    fn_ids_.emplace(key, id);
    return id;
  }

  void submit(std::shared_ptr<JobBase> job) {
    {
      std::lock_guard lock(mutex_);
      if (state_ != PoolState::run) {
        throw ProcessError(fmt::format("cannot submit {} to the pool: it is {}",
                                       job->describe(0, job->items),
                                       state_ == PoolState::close ? "closed" : "terminated"));
      }
      submitted_.push_back(std::move(job));
      has_news_.store(true, std::memory_order_release);
    }
    ring_service();
  }

  void close() {
    {
      std::lock_guard lock(mutex_);
      if (state_ == PoolState::run) state_ = PoolState::close;
      has_news_.store(true, std::memory_order_release);
    }
    ring_service();
  }

  void terminate() {
    {
      std::lock_guard lock(mutex_);
      state_ = PoolState::terminate;
      has_news_.store(true, std::memory_order_release);
    }
    ring_service();
    join_threads();
  }

  void join() {
    {
      std::lock_guard lock(mutex_);
      if (state_ == PoolState::run) {
        throw ProcessError(
            "cannot join a pool that is still running: call close() or terminate() first");
      }
    }
    join_threads();
  }

  int processes() const noexcept { return processes_; }

  std::vector<pid_t> pids() const {
    std::lock_guard lock(pids_mutex_);
    return pids_;
  }
  std::size_t started() const {
    std::lock_guard lock(pids_mutex_);
    return started_;
  }

 private:
  void join_threads() {
    if (std::this_thread::get_id() == callbacks_.get_id() ||
        std::this_thread::get_id() == service_.get_id()) {
      throw ProcessError("cannot join or terminate a pool from one of its own callbacks");
    }
    std::lock_guard join_lock(join_mutex_);
    if (service_.joinable()) service_.join();
    {
      std::lock_guard lock(cb_mutex_);
      cb_stop_ = true;
    }
    cb_cv_.notify_all();
    if (callbacks_.joinable()) callbacks_.join();
  }

  // Wakes the service thread if it sleeps in poll().
  void ring_service() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    auto& parked = layout_.header()->parked;
    if (parked.load(std::memory_order_relaxed) != 0 && parked.exchange(0) != 0) {
      std::uint64_t one = 1;
      if (retry_eintr([&] { return ::write(bell_.get(), &one, sizeof one); }) == -1 &&
          errno != EAGAIN) {
        throw_errno("wake the pool's service thread");
      }
    }
  }

  // ---- workers

  void start_worker(std::uint32_t slot) {
    SlotShared& s = layout_.slot(slot);
    s.running.store(0);
    s.state.store(kSlotBooting);
    s.low_water.store(0);
    s.sleeping.store(0);
    s.frames_in.store(0);
    s.inbox.tail.store(0);
    s.inbox.head.store(0);
    s.outbox.tail.store(0);
    s.outbox.head.store(0);

    WorkerBoot boot;
    boot.region_fd = region_.fd();
    boot.bell_fd = bell_.get();
    boot.slot = slot;
    boot.maxtasks = maxtasks_;
    if (const PortableTarget* init = initializer_.target()) {
      boot.has_init = true;
      boot.init_trampoline = init->trampoline;
      boot.init_target = init->target;
      boot.init_has_target = init->has_target;
      boot.init_args = init->args;
      boot.init_fds = init->fds;
    }
    auto rec = std::make_unique<WorkerRec>();
    rec->slot = slot;
    rec->proc = Process(context_, &pool_worker_main, std::move(boot));
    rec->proc.set_name(fmt::format("{}PoolWorker-{}", prefix_, ++counter_));
    rec->proc.set_daemon(true);
    rec->proc.start();
    rec->pid = rec->proc.pid();
    workers_[slot] = std::move(rec);
    {
      std::lock_guard lock(pids_mutex_);
      ++started_;
    }
    update_pids();
  }

  void update_pids() {
    std::vector<pid_t> pids;
    for (const auto& w : workers_) {
      if (w) pids.push_back(w->pid);
    }
    std::lock_guard lock(pids_mutex_);
    pids_ = std::move(pids);
  }

  // SIGKILL and reap every worker; the records stay (with their chunks) until drop_workers().
  void kill_all_workers() noexcept {
    for (auto& w : workers_) {
      if (!w) continue;
      try {
        w->proc.kill();
        w->proc.join();
      } catch (const std::exception& e) {
        report_noexcept(e.what());
      }
    }
  }

  void drop_workers() {
    for (auto& w : workers_) w.reset();
    update_pids();
  }

  void wake_worker(std::uint32_t slot) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    auto& sleeping = layout_.slot(slot).sleeping;
    if (sleeping.load(std::memory_order_relaxed) != 0 && sleeping.exchange(0) != 0) {
      futex_wake(sleeping, 1);
    }
  }

  // ---- the service thread

  void service_main(BusySpan& span) noexcept {
    span_ = &span;
    try {
      loop();
    } catch (const std::exception& e) {
      // Nothing here should throw; if it does, the pool must still not hang its users.
      report_noexcept(fmt::format("the pool's service thread failed: {}", e.what()));
      try {
        auto error = std::current_exception();
        kill_all_workers();
        fail_everything(error);
        drop_workers();
        std::lock_guard lock(mutex_);
        state_ = PoolState::terminate;
      } catch (...) {
        report_noexcept("the pool could not clean up after its service thread failed");
      }
    }
  }

  void loop() {
    auto last_check = std::chrono::steady_clock::now();
    for (;;) {
      span_->checkpoint();  // between two steps: a waiting fork may go now
      bool progress = intake();
      for (auto& w : workers_) {
        if (w && drain(*w)) progress = true;
      }
      if (break_error_ && !broken_) {
        break_pool();
        progress = true;
      }
      if (seen_ == PoolState::terminate) {
        terminate_workers();
        fail_everything(std::make_exception_ptr(
            CancelledError("cannot finish the task: the pool was terminated")));
        drop_workers();
        return;
      }
      auto now = std::chrono::steady_clock::now();
      if (now - last_check >= kDeathCheck) {
        last_check = now;
        if (check_deaths()) progress = true;
      }
      if (dispatch()) progress = true;
      if (maintain_workers()) progress = true;
      if (seen_ == PoolState::close && open_chunks_ == 0) {
        // Everything submitted is answered: stop the workers, wait for them to exit.
        for (auto& w : workers_) {
          if (!w || w->stopping || w->retiring) continue;
          stage_frame(*w, FrameHeader{sizeof(FrameHeader), 0, 0, 0, kStop}, {});
          w->stopping = true;
          flush(*w);
        }
        if (std::none_of(workers_.begin(), workers_.end(),
                         [](const auto& w) { return w != nullptr; })) {
          return;
        }
      }
      if (!progress) {
        if (park()) last_check = std::chrono::steady_clock::time_point{};
      }
    }
  }

  // Takes new jobs and state changes from user threads.
  bool intake() {
    if (!has_news_.load(std::memory_order_acquire)) return false;
    std::vector<std::shared_ptr<JobBase>> got;
    {
      std::lock_guard lock(mutex_);
      has_news_.store(false, std::memory_order_relaxed);
      got.swap(submitted_);
      seen_ = state_;
      for (std::size_t i = fns_seen_.size(); i < fns_.size(); ++i) fns_seen_.push_back(fns_[i]);
    }
    for (auto& job : got) {
      job->chunks_left = job->chunks();
      if (broken_) {
        job->fail(0, job->items, broken_);
        job->chunks_left = 0;
      }
      if (job->chunks_left == 0) {
        finish(job);
        continue;
      }
      open_chunks_ += job->chunks_left;
      jobs_.push_back(std::move(job));
    }
    return true;
  }

  void finish(const std::shared_ptr<JobBase>& job) {
    if (job->has_callbacks()) {
      {
        std::lock_guard lock(cb_mutex_);
        cb_queue_.push_back(job);
      }
      cb_cv_.notify_one();
    } else {
      job->complete();
    }
  }

  void answered(const std::shared_ptr<JobBase>& job) {
    --open_chunks_;
    if (--job->chunks_left == 0) finish(job);
  }

  void fail_chunk(const std::shared_ptr<JobBase>& job, std::size_t chunk,
                  const std::exception_ptr& e) {
    job->fail(job->chunk_first(chunk), job->chunk_count(chunk), e);
    answered(job);
  }

  // Reads the worker's outbox and handles every complete frame in it.
  bool drain(WorkerRec& w) {
    Ring out = layout_.outbox(w.slot);
    if (out.available() == 0) return false;
    out.read(w.in);
    wake_worker(w.slot);  // it may be waiting for room in the outbox
    while (!w.bad) {
      std::size_t have = w.in.size() - w.in_pos;
      if (have < sizeof(FrameHeader)) break;
      FrameHeader h;
      std::memcpy(&h, w.in.data() + w.in_pos, sizeof h);
      if (h.size < sizeof(FrameHeader) || h.size > kMaxFrame) {
        protocol_error(w, "a malformed frame");
        break;
      }
      if (have < h.size) break;
      handle_frame(w, h, std::string_view(w.in.data() + w.in_pos + sizeof h, h.size - sizeof h));
      w.in_pos += static_cast<std::size_t>(h.size);
    }
    if (w.in_pos == w.in.size()) {
      w.in.clear();
      w.in_pos = 0;
    } else if (w.in_pos > w.in.size() / 2) {
      w.in.erase(0, w.in_pos);
      w.in_pos = 0;
    }
    return true;
  }

  void handle_frame(WorkerRec& w, const FrameHeader& h, std::string_view payload) {
    if (h.kind == kInitError) {
      std::string type = "unknown exception", message;
      try {
        std::tie(type, message) = loads<std::string, std::string>(payload);
      } catch (...) {
      }
      if (!break_error_) {
        break_error_ = std::make_exception_ptr(
            RemoteError(type, fmt::format("in the pool's initializer: {}", message), w.pid));
      }
      return;
    }
    if (h.kind != kResult || w.inflight.empty() || w.inflight.front().id != h.id) {
      protocol_error(w, "a result for a task it was not running");
      return;
    }
    InFlight e = std::move(w.inflight.front());
    w.inflight.pop_front();
    std::size_t first = e.job->chunk_first(e.chunk), count = e.job->chunk_count(e.chunk);
    if (h.count != count) {
      e.job->fail(first, count,
                  std::make_exception_ptr(SerializationError(fmt::format(
                      "cannot decode the result of {}: worker {} sent {} results for {} tasks",
                      e.job->describe(first, count), w.pid, h.count, count))));
    } else {
      e.job->deliver(first, count, payload, w.pid);
    }
    answered(e.job);
    startup_deaths_ = 0;
    double ns = static_cast<double>(h.aux);
    avg_ns_ = avg_ns_ <= 0 ? ns : avg_ns_ + (ns - avg_ns_) / 8;
  }

  void protocol_error(WorkerRec& w, std::string_view what) {
    report_noexcept(fmt::format("pool worker {} sent {}; killing it", w.pid, what));
    w.bad = true;
    try {
      w.proc.kill();
    } catch (const std::exception& e) {
      report_noexcept(e.what());
    }
  }

  // Polls every worker's sentinel; handles those that ended. Returns whether any did.
  bool check_deaths() {
    std::vector<pollfd> fds;
    std::vector<std::uint32_t> slots;
    for (const auto& w : workers_) {
      if (!w) continue;
      fds.push_back(pollfd{w->proc.sentinel(), POLLIN, 0});
      slots.push_back(w->slot);
    }
    if (fds.empty()) return false;
    int r = retry_eintr([&] { return ::poll(fds.data(), fds.size(), 0); });
    if (r == -1) throw_errno("poll the pool's workers");
    if (r == 0) return false;
    for (std::size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents != 0) worker_ended(slots[i]);
    }
    return true;
  }

  void worker_ended(std::uint32_t slot) {
    std::unique_ptr<WorkerRec> w = std::move(workers_[slot]);
    w->proc.join();  // it has ended: this only reaps it
    int code = w->proc.exitcode().value_or(-SIGKILL);
    drain(*w);  // results it wrote before it ended
    SlotShared& s = layout_.slot(slot);
    std::uint64_t running = s.running.load(std::memory_order_acquire);
    bool was_ready = s.state.load(std::memory_order_acquire) == kSlotReady;
    int sig = code < 0 ? -code : 0;
    int status = code >= 0 ? code : 0;
    for (auto& e : w->inflight) {
      if (e.id <= running) {
        fail_chunk(e.job, e.chunk,
                   std::make_exception_ptr(WorkerLostError(
                       w->pid, sig, status,
                       e.job->describe(e.job->chunk_first(e.chunk), e.job->chunk_count(e.chunk)))));
      } else {
        redo_.emplace_back(e.job, e.chunk);  // never started: another worker runs it
      }
    }
    bool expected = (w->retiring || w->stopping) && code == 0;
    if (!expected && !was_ready && !broken_) {
      // A worker that dies on its own before it is ready (a crash in the initializer, an
      // exit status) more than a few times in a row would be replaced for ever.
      bool crashed = code > 0 || (sig != 0 && sig != SIGKILL && sig != SIGTERM);
      if (crashed && ++startup_deaths_ >= 3 && !break_error_) {
        break_error_ = std::make_exception_ptr(WorkerLostError(
            w->pid, sig, status,
            "its initialization (workers keep dying before they are ready: the pool is broken)"));
      }
    }
    w.reset();
    update_pids();
  }

  std::size_t depth() const {
    if (avg_ns_ <= 0) return 2;
    double d = kQueuedNs / avg_ns_;
    return static_cast<std::size_t>(std::clamp(d, 1.0, static_cast<double>(kMaxDepth)));
  }

  WorkerRec* pick(std::size_t limit) {
    WorkerRec* best = nullptr;
    for (auto& w : workers_) {
      if (!w || w->retiring || w->stopping || w->bad || w->staged_pos < w->staged.size()) continue;
      if (w->inflight.size() >= limit) continue;
      if (!best || w->inflight.size() < best->inflight.size()) best = w.get();
    }
    return best;
  }

  bool dispatch() {
    if (broken_) return false;
    bool any = false;
    std::size_t limit = depth();
    for (;;) {
      std::shared_ptr<JobBase> job;
      std::size_t chunk = 0;
      bool redo = !redo_.empty();
      if (redo) {
        job = redo_.front().first;
        chunk = redo_.front().second;
      } else {
        while (!jobs_.empty() && jobs_.front()->next_chunk >= jobs_.front()->chunks())
          jobs_.pop_front();
        if (jobs_.empty()) break;
        job = jobs_.front();
        chunk = job->next_chunk;
      }
      WorkerRec* w = pick(limit);
      if (!w) break;
      send_task(*w, job, chunk, limit);
      if (redo) {
        redo_.pop_front();
      } else {
        ++job->next_chunk;
      }
      any = true;
    }
    return any;
  }

  void send_task(WorkerRec& w, const std::shared_ptr<JobBase>& job, std::size_t chunk,
                 std::size_t limit) {
    if (job->fn >= w.known_fns) {
      std::vector<FnWire> defs(fns_seen_.begin() + w.known_fns, fns_seen_.end());
      std::string body = dumps(defs);
      stage_frame(w,
                  FrameHeader{sizeof(FrameHeader) + body.size(), w.known_fns, 0,
                              static_cast<std::uint32_t>(defs.size()), kDefine},
                  body);
      w.known_fns = static_cast<std::uint32_t>(fns_seen_.size());
    }
    std::size_t first = job->chunk_first(chunk), count = job->chunk_count(chunk);
    std::size_t from = job->item_offset[first], to = job->item_offset[first + count];
    std::uint64_t id = next_id_++;
    stage_frame(w,
                FrameHeader{sizeof(FrameHeader) + (to - from), id, job->fn,
                            static_cast<std::uint32_t>(count), kTask},
                std::string_view(job->args).substr(from, to - from));
    w.inflight.push_back(InFlight{id, job, chunk});
    if (maxtasks_ != 0 && ++w.dispatched >= maxtasks_) w.retiring = true;
    layout_.slot(w.slot).low_water.store(static_cast<std::uint32_t>(limit / 2),
                                         std::memory_order_relaxed);
    flush(w);
  }

  void stage_frame(WorkerRec& w, const FrameHeader& h, std::string_view body) {
    if (w.staged_pos == w.staged.size()) {
      w.staged.clear();
      w.staged_pos = 0;
    }
    w.staged.append(reinterpret_cast<const char*>(&h), sizeof h);
    w.staged.append(body);
    ++w.staged_frames;
  }

  // Writes what fits of the worker's staged frames into its inbox, and wakes it.
  bool flush(WorkerRec& w) {
    if (w.staged_pos == w.staged.size()) return false;
    Ring in = layout_.inbox(w.slot);
    std::size_t n = in.write(w.staged.data() + w.staged_pos, w.staged.size() - w.staged_pos);
    w.staged_pos += n;
    if (w.staged_pos == w.staged.size()) {
      w.frames_sent += w.staged_frames;
      w.staged_frames = 0;
      w.staged.clear();
      w.staged_pos = 0;
      layout_.slot(w.slot).frames_in.store(w.frames_sent, std::memory_order_release);
    }
    if (n > 0) wake_worker(w.slot);
    return n > 0;
  }

  bool maintain_workers() {
    bool any = false;
    for (auto& w : workers_) {
      if (w && flush(*w)) any = true;
    }
    if (broken_ || seen_ == PoolState::terminate) return any;
    if (seen_ == PoolState::close && open_chunks_ == 0) return any;
    auto now = std::chrono::steady_clock::now();
    if (now < retry_at_) return any;
    int active = 0;
    for (const auto& w : workers_) {
      if (w && !w->retiring && !w->stopping && !w->bad) ++active;
    }
    for (std::uint32_t slot = 0; active < processes_ && slot < nslots_; ++slot) {
      if (workers_[slot]) continue;
      try {
        start_worker(slot);
        ++active;
        start_failures_ = 0;
        any = true;
      } catch (const std::exception& e) {
        ++start_failures_;
        report_noexcept(fmt::format("the pool cannot start a worker: {}", e.what()));
        retry_at_ = now + std::chrono::milliseconds(100) * start_failures_;
        bool none = std::none_of(workers_.begin(), workers_.end(),
                                 [](const auto& p) { return p != nullptr; });
        if (start_failures_ >= 3 && none && !break_error_) break_error_ = std::current_exception();
        break;
      }
    }
    return any;
  }

  // Sleeps until a worker rings, a user thread submits, or a worker ends. Returns whether
  // a worker may have ended.
  bool park() {
    auto busy = [&] {
      if (has_news_.load(std::memory_order_acquire)) return true;
      for (const auto& w : workers_) {
        if (!w) continue;
        if (layout_.outbox(w->slot).available() > 0) return true;
        // Staged frame bytes that now fit (the worker read some of its inbox).
        if (w->staged_pos < w->staged.size() && layout_.inbox(w->slot).free_space() > 0)
          return true;
      }
      return false;
    };
    for (int i = 0; i < kServiceSpin; ++i) {
      if (busy()) return false;
      cpu_relax();
    }
    auto& parked = layout_.header()->parked;
    parked.store(1, std::memory_order_seq_cst);
    if (busy()) {
      parked.store(0, std::memory_order_relaxed);
      return false;
    }
    std::vector<pollfd> fds{{bell_.get(), POLLIN, 0}};
    for (const auto& w : workers_) {
      if (w) fds.push_back(pollfd{w->proc.sentinel(), POLLIN, 0});
    }
    int timeout = open_chunks_ > 0 ? kInFlightPollMs : -1;
    auto now = std::chrono::steady_clock::now();
    if (retry_at_ > now) {
      int retry =
          static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(retry_at_ - now).count());
      timeout = timeout < 0 ? retry : std::min(timeout, retry);
    }
    int r = span_->idle([&] { return ::poll(fds.data(), fds.size(), timeout); });
    parked.store(0, std::memory_order_relaxed);
    if (r == -1 && errno != EINTR) throw_errno("wait for the pool's workers");
    if (fds[0].revents & POLLIN) {
      std::uint64_t count = 0;
      if (::read(bell_.get(), &count, sizeof count) == -1 && errno != EAGAIN && errno != EINTR) {
        throw_errno("read the pool's eventfd");
      }
    }
    return std::any_of(fds.begin() + 1, fds.end(), [](const pollfd& p) { return p.revents != 0; });
  }

  // SIGTERM to every worker, SIGKILL after a grace period, then reap them all.
  void terminate_workers() {
    for (auto& w : workers_) {
      if (w) w->proc.terminate();
    }
    auto deadline = std::chrono::steady_clock::now() + kTerminateGrace;
    for (;;) {
      std::vector<pollfd> fds;
      for (const auto& w : workers_) {
        if (w && !w->proc.exitcode()) fds.push_back(pollfd{w->proc.sentinel(), POLLIN, 0});
      }
      auto left =
          std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (fds.empty() || left.count() <= 0) break;
      span_->idle([&] { return ::poll(fds.data(), fds.size(), static_cast<int>(left.count())); });
    }
    kill_all_workers();
  }

  // Every chunk not yet answered fails with `error` (terminate, a broken pool).
  void fail_everything(const std::exception_ptr& error) {
    for (auto& w : workers_) {
      if (!w) continue;
      for (auto& e : w->inflight) fail_chunk(e.job, e.chunk, error);
      w->inflight.clear();
    }
    for (auto& [job, chunk] : redo_) fail_chunk(job, chunk, error);
    redo_.clear();
    for (auto& job : jobs_) {
      for (; job->next_chunk < job->chunks(); ++job->next_chunk)
        fail_chunk(job, job->next_chunk, error);
    }
    jobs_.clear();
    std::vector<std::shared_ptr<JobBase>> got;
    {
      std::lock_guard lock(mutex_);
      got.swap(submitted_);
    }
    for (auto& job : got) {
      job->fail(0, job->items, error);
      finish(job);
    }
  }

  // The pool cannot work (its initializer fails, workers cannot be started): every task,
  // now and later, fails with the reason.
  void break_pool() {
    broken_ = break_error_;
    kill_all_workers();
    fail_everything(broken_);
    drop_workers();
  }

  // Its busy span covers its own start, end and the release of each job: it sleeps, and
  // runs the user's callbacks (which may block, or start processes), outside the span. It
  // re-enters the span with no lock held: the service thread, busy, takes cb_mutex_.
  void callback_main(BusySpan& span) noexcept {
    for (;;) {
      std::shared_ptr<JobBase> job;
      bool stop = span.idle([&] {
        std::unique_lock lock(cb_mutex_);
        cb_cv_.wait(lock, [&] { return !cb_queue_.empty() || cb_stop_; });
        if (cb_queue_.empty()) return true;
        job = std::move(cb_queue_.front());
        cb_queue_.pop_front();
        return false;
      });
      if (stop) return;
      // Runs the callbacks (reporting what they throw), then marks the job ready.
      span.idle([&] { job->complete(); });
      job.reset();  // in the span: this may free the job
    }
  }

  BusySpan* span_ = nullptr;  // the service thread's, while it runs

  // Configuration.
  Initializer initializer_;
  Context context_;
  int processes_ = 0;
  std::uint32_t maxtasks_ = 0;
  std::uint32_t nslots_ = 0;
  std::string prefix_;
  Region region_;
  Layout layout_;
  UniqueFd bell_;

  // Shared with user threads, under mutex_.
  mutable std::mutex mutex_;
  PoolState state_ = PoolState::run;
  std::vector<std::shared_ptr<JobBase>> submitted_;
  std::atomic<bool> has_news_{false};
  std::vector<FnWire> fns_;
  std::map<std::pair<const void*, const void*>, std::uint32_t> fn_ids_;

  // The service thread's own state (and the constructor's, before the thread starts).
  std::vector<std::unique_ptr<WorkerRec>> workers_;  // by slot; null: free
  std::vector<FnWire> fns_seen_;
  std::deque<std::shared_ptr<JobBase>> jobs_;  // jobs with chunks not yet handed out
  std::deque<std::pair<std::shared_ptr<JobBase>, std::size_t>> redo_;
  std::size_t open_chunks_ = 0;  // chunks not yet answered, over all jobs
  std::uint64_t next_id_ = 1;
  double avg_ns_ = 0;  // moving average of a chunk's run time
  PoolState seen_ = PoolState::run;
  std::exception_ptr break_error_;
  std::exception_ptr broken_;
  int start_failures_ = 0;
  int startup_deaths_ = 0;
  std::chrono::steady_clock::time_point retry_at_{};
  std::uint64_t counter_ = 0;

  mutable std::mutex pids_mutex_;
  std::vector<pid_t> pids_;
  std::size_t started_ = 0;

  std::mutex cb_mutex_;
  std::condition_variable cb_cv_;
  std::deque<std::shared_ptr<JobBase>> cb_queue_;
  bool cb_stop_ = false;

  std::mutex join_mutex_;
  std::thread service_;
  std::thread callbacks_;
};

std::uint32_t pool_function_id(PoolEngine& engine, const void* trampoline, const void* target) {
  return engine.function_id(trampoline, target);
}

void pool_submit(PoolEngine& engine, std::shared_ptr<JobBase> job) {
  engine.submit(std::move(job));
}

int pool_processes(const PoolEngine& engine) { return engine.processes(); }

}  // namespace detail

// ---- Pool -------------------------------------------------------------------------------

Pool::Pool(int processes, Initializer initializer, int maxtasksperchild)
    : Pool(processes, std::move(initializer), maxtasksperchild, get_context()) {}

Pool::Pool(int processes, Initializer initializer, int maxtasksperchild, const Context& context)
    : engine_(std::make_unique<detail::PoolEngine>(processes, std::move(initializer),
                                                   maxtasksperchild, context)) {}

Pool::Pool(Pool&&) noexcept = default;

Pool& Pool::operator=(Pool&& other) noexcept {
  if (this != &other) {
    engine_.reset();  // terminates this pool first
    engine_ = std::move(other.engine_);
  }
  return *this;
}

Pool::~Pool() = default;  // the engine's destructor terminates and joins

detail::PoolEngine& Pool::engine() const {
  if (!engine_) throw ProcessError("cannot use a Pool that was moved from");
  return *engine_;
}

void Pool::close() { engine().close(); }
void Pool::terminate() { engine().terminate(); }
void Pool::join() { engine().join(); }
int Pool::processes() const { return engine().processes(); }
std::vector<pid_t> Pool::worker_pids() const { return engine().pids(); }
std::size_t Pool::workers_started() const { return engine().started(); }

}  // namespace mp
