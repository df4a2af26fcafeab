// mp/src/logging.cpp - the process's log threshold and handler, QueueHandler, the sinks and
// QueueListener's thread.
#include "mp/logging.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <ctime>
#include <exception>
#include <mutex>
#include <system_error>

#include "mp/detail/fd.hpp"
#include "mp/error.hpp"
#include "mp/process.hpp"

namespace mp {
namespace {

// The process-wide state. Never destroyed: workers log until std::_Exit, and static
// destructors of the parent may run while other threads still log.
struct Global {
  std::mutex mutex;                           // guards `handler`
  std::shared_ptr<const LogHandler> handler;  // nullptr: the default (stderr)
  std::atomic<std::int32_t> level{static_cast<std::int32_t>(Level::warning)};
};

Global& global() {
  static Global* g = [] {
    auto* state = new Global;
    // A fork while another thread holds the mutex would leave it locked for ever in the
    // child: hold it across fork() instead, as Python's logging module does.
    int err = ::pthread_atfork([] { global().mutex.lock(); }, [] { global().mutex.unlock(); },
                               [] { global().mutex.unlock(); });
    if (err != 0) throw system_error(err, "register the logging fork handlers");
    return state;
  }();
  return *g;
}

// Writes all of [data, data + n) to fd: one write() unless the kernel takes less.
void write_all(int fd, std::string_view data, std::string_view what) {
  while (!data.empty()) {
    ssize_t w = detail::retry_eintr([&] { return ::write(fd, data.data(), data.size()); });
    if (w == -1) throw_errno(what);
    data.remove_prefix(static_cast<std::size_t>(w));
  }
}

// The default handler: the formatted line straight to stderr.
void write_to_stderr(const LogRecord& r) {
  std::string line = format_record(r);
  line.push_back('\n');
  write_all(STDERR_FILENO, line, "write a log line to stderr");
}

void append_escaped(std::string& out, std::string_view s) {
  for (char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else {
      out.push_back(c);
    }
  }
}

// The marker record stop() puts: a level no logger uses.
constexpr auto kStopLevel = static_cast<Level>(INT32_MIN);

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

std::string level_name(Level level) {
  switch (level) {
    case Level::debug:
      return "DEBUG";
    case Level::info:
      return "INFO";
    case Level::warning:
      return "WARNING";
    case Level::error:
      return "ERROR";
    case Level::critical:
      return "CRITICAL";
  }
  return fmt::format("LEVEL {}", static_cast<std::int32_t>(level));
}

void set_log_level(Level level) {
  global().level.store(static_cast<std::int32_t>(level), std::memory_order_relaxed);
}

Level log_level() noexcept {
  return static_cast<Level>(global().level.load(std::memory_order_relaxed));
}

bool log_enabled(Level level) noexcept { return level >= log_level(); }

void set_log_handler(LogHandler handler) {
  std::shared_ptr<const LogHandler> h;
  if (handler) h = std::make_shared<const LogHandler>(std::move(handler));
  Global& g = global();
  std::lock_guard lock(g.mutex);
  g.handler.swap(h);
}  // the old handler is destroyed after the unlock, once no thread still uses it

namespace detail {

void emit_record(Level level, std::string_view logger, std::string message) noexcept {
  try {
    LogRecord r;
    r.level = level;
    r.logger.assign(logger);
    r.process = current_process().name;
    r.pid = ::getpid();
    r.time_ns = now_ns();
    r.message = std::move(message);
    std::shared_ptr<const LogHandler> h;
    {
      Global& g = global();
      std::lock_guard lock(g.mutex);
      h = g.handler;
    }
    if (h) {
      (*h)(r);
    } else {
      write_to_stderr(r);
    }
  } catch (const std::exception& e) {
    report_noexcept(fmt::format("cannot log a record: {}", e.what()));
  } catch (...) {
    report_noexcept("cannot log a record: an unknown exception");
  }
}

}  // namespace detail

Logger& get_logger() {
  static Logger* logger = new Logger("mp");
  return *logger;
}

Logger& log_to_stderr(Level level) {
  set_log_handler(nullptr);  // the default handler writes to stderr
  set_log_level(level);
  return get_logger();
}

std::string format_record(const LogRecord& r) {
  using namespace std::chrono;
  std::int64_t secs = r.time_ns / 1'000'000'000;
  std::int64_t ms = (r.time_ns % 1'000'000'000) / 1'000'000;
  if (ms < 0) {  // before 1970: floor, not truncate
    ms += 1000;
    --secs;
  }
  std::time_t t = static_cast<std::time_t>(secs);
  std::tm tm{};
  std::string out;
  if (::localtime_r(&t, &tm) != nullptr) {
    out = fmt::format("{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} [", tm.tm_year + 1900,
                      tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
  } else {
    out = fmt::format("@{}.{:03} [", secs, ms);  // a time localtime cannot represent
  }
  out += level_name(r.level);
  out.push_back('/');
  append_escaped(out, r.process);
  fmt::format_to(std::back_inserter(out), ":{}] ", r.pid);
  append_escaped(out, r.logger);
  out += ": ";
  append_escaped(out, r.message);
  return out;
}

// ---- QueueHandler ------------------------------------------------------------------------

void QueueHandler::operator()(const LogRecord& record) const noexcept {
  try {
    // A record too large for the queue would be refused whole: shorten its message to fit.
    // The encoding adds the three strings' sizes (8 bytes each) and five small fields.
    const std::size_t max = queue_.max_message_size();
    const std::size_t fixed = 128 + record.logger.size() + record.process.size();
    if (fixed + record.message.size() > max) {
      LogRecord shorter = record;
      // The note is at most 80 bytes; what is kept of the message leaves room for it.
      std::size_t room = max > fixed + 80 ? max - fixed - 80 : 0;
      std::size_t keep = std::min(room, record.message.size());
      shorter.message.resize(keep);
      shorter.message += fmt::format(" [mp: {} bytes cut: too large for the log queue]",
                                     record.message.size() - keep);
      queue_.put(shorter);  // still too large (huge names): the catch below takes it
    } else {
      queue_.put(record);
    }
    return;
  } catch (const std::exception& e) {
    // The queue is closed, or broken: this line goes to stderr rather than nowhere.
    try {
      LogRecord r = record;
      r.message += fmt::format(" [mp: sent to stderr: {}]", e.what());
      write_to_stderr(r);
    } catch (const std::exception& e2) {
      detail::report_noexcept(fmt::format("cannot log a record: {}", e2.what()));
    }
  } catch (...) {
    detail::report_noexcept("cannot put a log record into the queue");
  }
}

void log_to_queue(LogQueue queue, Level level) {
  set_log_handler(QueueHandler{std::move(queue)});
  set_log_level(level);
}

// ---- sinks -------------------------------------------------------------------------------

LogSink stderr_sink(Level level) {
  return LogSink{[](const LogRecord&, std::string_view line) {
                   write_all(STDERR_FILENO, line, "write a log line to stderr");
                 },
                 level};
}

LogSink fd_sink(int fd, Level level) {
  return LogSink{[fd](const LogRecord&, std::string_view line) {
                   write_all(fd, line, fmt::format("write a log line to descriptor {}", fd));
                 },
                 level};
}

LogSink file_sink(const std::string& path, Level level) {
  int fd = detail::retry_eintr(
      [&] { return ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644); });
  if (fd == -1) throw_errno(fmt::format("open the log file {}", path));
  auto owned = std::make_shared<detail::UniqueFd>(fd);
  return LogSink{[owned, path](const LogRecord&, std::string_view line) {
                   write_all(owned->get(), line, fmt::format("write to the log file {}", path));
                 },
                 level};
}

// ---- QueueListener -----------------------------------------------------------------------

struct QueueListener::State {
  std::vector<LogSink> sinks;
  LogFormatter formatter;
  std::string token;  // the message of this run's stop marker
  std::atomic<std::uint64_t> records{0};
  std::atomic<std::uint64_t> failures{0};
  mutable std::mutex mutex;  // guards first_failure
  std::string first_failure;

  void fail(std::string what) {
    failures.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(mutex);
    if (first_failure.empty()) first_failure = std::move(what);
  }
};

QueueListener::QueueListener(LogQueue queue, std::vector<LogSink> sinks, LogFormatter formatter)
    : queue_(std::move(queue)), state_(std::make_shared<State>()) {
  state_->sinks = std::move(sinks);
  state_->formatter = formatter ? std::move(formatter) : LogFormatter(format_record);
}

QueueListener::~QueueListener() {
  try {
    stop();
  } catch (const std::exception& e) {
    detail::report_noexcept(fmt::format("cannot stop the log listener: {}", e.what()));
    // The thread owns copies of the queue and of the state: it may outlive this object.
    if (thread_ && thread_->joinable()) thread_->detach();
  }
}

bool QueueListener::running() const noexcept { return thread_ != nullptr && owner_ == ::getpid(); }

bool QueueListener::forget_if_forked() noexcept {
  if (thread_ == nullptr || owner_ == ::getpid()) return false;
  // A fork child's copy of a running listener: the thread is the parent's. Joining it here
  // would be undefined, and a stop marker would stop the parent's thread: leave both alone.
  (void)thread_.release();
  return true;
}

void QueueListener::start() {
  forget_if_forked();
  if (thread_ != nullptr) throw ProcessError("cannot start the log listener: it is running");
  static std::atomic<std::uint64_t> runs{0};
  state_->token = fmt::format("mp-log-stop {} {} {}", ::getpid(), static_cast<void*>(this),
                              runs.fetch_add(1) + 1);
  owner_ = ::getpid();
  thread_ = std::make_unique<std::thread>([queue = queue_, state = state_]() mutable {
    for (;;) {
      LogRecord r;
      try {
        r = queue.get();
      } catch (const ShutDown&) {
        return;  // closed and drained
      } catch (const SerializationError& e) {
        state->fail(fmt::format("cannot decode a log record: {}", e.what()));
        continue;  // that message is gone; the next one is whole
      } catch (const std::exception& e) {
        state->fail(fmt::format("cannot get a log record: {}", e.what()));
        return;
      }
      if (r.level == kStopLevel) {
        if (r.message == state->token) return;
        continue;  // an older run's marker
      }
      std::string line;
      try {
        line = state->formatter(r);
        line.push_back('\n');
      } catch (const std::exception& e) {
        state->fail(fmt::format("cannot format a log record: {}", e.what()));
        continue;
      }
      for (const LogSink& sink : state->sinks) {
        if (r.level < sink.level || !sink.write) continue;
        try {
          sink.write(r, line);
        } catch (const std::exception& e) {
          state->fail(e.what());
        } catch (...) {
          state->fail("a log sink threw an unknown exception");
        }
      }
      state->records.fetch_add(1, std::memory_order_relaxed);
    }
  });
}

void QueueListener::stop() {
  if (forget_if_forked() || thread_ == nullptr) return;
  LogRecord marker;
  marker.level = kStopLevel;
  marker.pid = ::getpid();
  marker.message = state_->token;
  try {
    queue_.put(marker);  // after every record already put: the queue is FIFO
  } catch (const ShutDown&) {
    // Closed: the thread ends by itself once it has drained the queue.
  }
  thread_->join();
  thread_.reset();
}

std::uint64_t QueueListener::records() const noexcept {
  return state_->records.load(std::memory_order_relaxed);
}

std::uint64_t QueueListener::failures() const noexcept {
  return state_->failures.load(std::memory_order_relaxed);
}

std::string QueueListener::first_failure() const {
  std::lock_guard lock(state_->mutex);
  return state_->first_failure;
}

}  // namespace mp
