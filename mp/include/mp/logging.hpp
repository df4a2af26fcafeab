// mp/logging.hpp - log lines from worker processes, gathered whole in one place (Python:
// logging.handlers.QueueHandler / QueueListener, multiprocessing.get_logger / log_to_stderr).
//
//   mp::LogQueue q;                                       // an mp::Queue<mp::LogRecord>
//   mp::QueueListener listener{q, {mp::file_sink("run.log"),
//                                  mp::stderr_sink(mp::Level::error)}};
//   listener.start();                                     // a thread here writes every record
//   mp::Pool pool{4, {mp::log_to_queue, q, mp::Level::info}};  // each worker sends to q
//   ... in a worker:  mp::log(mp::Level::info, "task {} done", i);
//                     mp::Logger log{"fetch"};  log.warning("retry {} of {}", k, n);
//   listener.stop();                                      // writes all that was put before it
//
// The API:
//   Level                  debug < info < warning < error < critical (Python's numbers).
//   LogRecord              level, logger, process name, pid, time, message (cereal).
//   LogQueue               mp::Queue<LogRecord>: what handlers put into and listeners read.
//   log(level, fmt, ...)   formats with fmt and hands the record to this process's handler.
//   Logger{name}           the same with a name and an optional level of its own.
//   set_log_level(level)   this process's threshold (default warning): records below it are
//                          not even formatted.
//   set_log_handler(h)     where this process's records go (default: straight to stderr).
//   QueueHandler{q}        a handler that puts each record into q.
//   log_to_queue(q, lvl)   set_log_handler(QueueHandler{q}) + set_log_level(lvl): a ready
//                          pool initializer / first line of a worker.
//   QueueListener          a thread in the parent that gets records and writes each one,
//                          formatted, to its sinks with one write() per line.
//   stderr_sink, file_sink, fd_sink, or any callable: where a listener writes.
//   format_record(r)       the default line: "2026-12-03 11:49:41.123
//                          [INFO/ForkPoolWorker-1:4242] worker: task 3 done" (one line).
//   get_logger()           the logger named "mp" (Python: multiprocessing.get_logger()).
//   log_to_stderr(level)   this process logs to stderr from now on, at `level`.
//
// Why lines stay whole. Every record travels as one queue message, and a queue message is
// all or nothing, even when its sender is SIGKILLed inside put() (mp/queue.hpp). Only the
// listener's thread writes, one record at a time, with a single write() per line (the rest
// of a short write is written straight after, and EINTR is retried). A message's own line
// breaks are written as the two characters "\n", so a record is exactly one line and every
// line carries its process name and pid.
//
// Where it differs from Python, and why:
//   - A worker's put() has copied the record into shared memory when log() returns: there
//     is no feeder thread, so a worker may log and crash (or _exit) at once and the line
//     still arrives. Python's QueueHandler loses what its feeder had not sent.
//   - A full queue makes log() wait (no line is dropped); Python's QueueHandler uses
//     put_nowait and reports queue.Full. A message too large for the queue is shortened to
//     fit, with a note saying how much was cut. A closed queue, or any other failure to
//     put, sends that line to stderr instead: nothing vanishes silently, and the handler
//     never throws into the code that logged.
//   - No logger hierarchy, propagation, filters or handler list: one threshold and one
//     handler per process, and per-sink levels in the listener. A worker needs little more,
//     and the state is small enough to survive fork (it is locked around fork()).
//   - Messages are fmt format strings checked at compile time, not %-style strings.
//   - The default handler of a process that installed none writes each line to stderr
//     itself (Python's "last resort" handler only prints the message).
#pragma once

#include <fmt/format.h>
#include <sys/types.h>

#include <cereal/cereal.hpp>
#include <cereal/types/string.hpp>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "mp/queue.hpp"

namespace mp {

// Severity, with Python's numeric values (logging.DEBUG == 10 ...).
enum class Level : std::int32_t { debug = 10, info = 20, warning = 30, error = 40, critical = 50 };

// "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL" (or "LEVEL <n>" for another value).
std::string level_name(Level level);

// One log event, as it travels from a worker to the listener.
struct LogRecord {
  Level level = Level::info;  // severity
  std::string logger;         // the Logger's name ("root" for mp::log)
  std::string process;        // mp::current_process().name in the sender
  pid_t pid = 0;              // the sender's pid
  std::int64_t time_ns = 0;   // when it was made: system_clock, ns since the Unix epoch
  std::string message;        // the formatted message

  template <class Archive>
  void serialize(Archive& ar) {
    ar(level, logger, process, pid, time_ns, message);
  }
};

// The queue that carries records from handlers to a listener.
using LogQueue = Queue<LogRecord>;

// Where a process's records go (the handler is called in the thread that logged).
using LogHandler = std::function<void(const LogRecord&)>;

// This process's threshold (default Level::warning, as Python's root logger).
void set_log_level(Level level);
Level log_level() noexcept;
// Whether a record of this level would be handed to the handler.
bool log_enabled(Level level) noexcept;

// Replaces this process's handler; nullptr restores the default (stderr, format_record).
// A fork child inherits the handler; spawn and forkserver children start with the default.
void set_log_handler(LogHandler handler);

namespace detail {
// Builds a record (time, pid, process name) and hands it to the handler. Never throws.
void emit_record(Level level, std::string_view logger, std::string message) noexcept;
}  // namespace detail

// Logs through the logger named "root" when `level` reaches this process's threshold.
template <class... Args>
void log(Level level, fmt::format_string<Args...> format, Args&&... args) {
  if (!log_enabled(level)) return;
  detail::emit_record(level, "root", fmt::format(format, std::forward<Args>(args)...));
}

// A named logger. Its level, when set, replaces the process threshold for its records.
class Logger {
 public:
  explicit Logger(std::string name, std::optional<Level> level = std::nullopt)
      : name_(std::move(name)), level_(level) {}

  const std::string& name() const noexcept { return name_; }
  // The level of its own, or std::nullopt to follow set_log_level().
  void set_level(std::optional<Level> level) noexcept { level_ = level; }
  // The threshold in force for this logger.
  Level level() const noexcept { return level_ ? *level_ : log_level(); }
  bool enabled(Level level) const noexcept { return level >= this->level(); }

  // Formats (only when enabled) and hands the record to the process's handler.
  template <class... Args>
  void log(Level level, fmt::format_string<Args...> format, Args&&... args) const {
    if (!enabled(level)) return;
    detail::emit_record(level, name_, fmt::format(format, std::forward<Args>(args)...));
  }
  template <class... Args>
  void debug(fmt::format_string<Args...> f, Args&&... a) const {
    log(Level::debug, f, std::forward<Args>(a)...);
  }
  template <class... Args>
  void info(fmt::format_string<Args...> f, Args&&... a) const {
    log(Level::info, f, std::forward<Args>(a)...);
  }
  template <class... Args>
  void warning(fmt::format_string<Args...> f, Args&&... a) const {
    log(Level::warning, f, std::forward<Args>(a)...);
  }
  template <class... Args>
  void error(fmt::format_string<Args...> f, Args&&... a) const {
    log(Level::error, f, std::forward<Args>(a)...);
  }
  template <class... Args>
  void critical(fmt::format_string<Args...> f, Args&&... a) const {
    log(Level::critical, f, std::forward<Args>(a)...);
  }

 private:
  std::string name_;
  std::optional<Level> level_;
};

// The logger named "mp" (Python: multiprocessing.get_logger()). The library itself does
// not log through it yet: it is there for programs that want Python's name.
Logger& get_logger();

// From now on this process's records go straight to stderr, one write() per line, and the
// threshold is `level` (Python: multiprocessing.log_to_stderr). Returns get_logger().
// Lines of several processes that write to one stderr this way stay whole only up to
// PIPE_BUF bytes; use a QueueListener for a guarantee.
Logger& log_to_stderr(Level level = Level::warning);

// The default line, without the final '\n':
// "2026-12-03 11:49:41.123 [INFO/PoolWorker-1:4242] worker: message" (local time). Line
// breaks and carriage returns in the message are written as "\n" and "\r".
std::string format_record(const LogRecord& record);

// A handler that puts every record into a queue; the queue's memory is shared, so copies
// of the handler (a fork child's) put into the same queue.
class QueueHandler {
 public:
  explicit QueueHandler(LogQueue queue) : queue_(std::move(queue)) {}
  // Puts the record, waiting while the queue is full. Never throws: a record that cannot
  // be put goes to stderr instead (formatted, one write()).
  void operator()(const LogRecord& record) const noexcept;
  const LogQueue& queue() const noexcept { return queue_; }

 private:
  mutable LogQueue queue_;  // a handle: putting changes the shared queue, not the handle
};

// set_log_handler(QueueHandler{queue}) and set_log_level(level). A plain function, so it
// can be a pool initializer under every start method: mp::Pool{4, {mp::log_to_queue, q,
// mp::Level::info}}, or the first line of a Process target.
void log_to_queue(LogQueue queue, Level level);

// Where a listener writes. `write` gets the record and its formatted line (ending in
// '\n'); records below `level` are not given to it (Python: a handler's level).
struct LogSink {
  std::function<void(const LogRecord& record, std::string_view line)> write;
  Level level = Level::debug;
};

// Writes each line to stderr with one write().
LogSink stderr_sink(Level level = Level::debug);
// Appends each line to the file at `path` (created 0644 when missing, O_APPEND), one
// write() per line. Opens the file now: throws std::system_error ("cannot open the log
// file <path>") on failure.
LogSink file_sink(const std::string& path, Level level = Level::debug);
// Writes each line to `fd`, which the caller keeps open while the listener runs.
LogSink fd_sink(int fd, Level level = Level::debug);

// The line a listener writes for a record (format_record by default); '\n' is appended.
using LogFormatter = std::function<std::string(const LogRecord&)>;

// A thread of this process that takes records from a queue and writes each, formatted
// once, to every sink whose level it reaches. Records are written in queue order, which
// keeps each process's own order.
class QueueListener {
 public:
  QueueListener(LogQueue queue, std::vector<LogSink> sinks, LogFormatter formatter = {});
  QueueListener(const QueueListener&) = delete;
  QueueListener& operator=(const QueueListener&) = delete;
  // stop(), reporting (not throwing) a failure on stderr.
  ~QueueListener();

  // Starts the thread. Throws mp::ProcessError when it is already running. A fork child's
  // copy of a running listener is not running: its stop() and destructor do nothing, and
  // it may start a thread of its own.
  void start();
  // Writes every record whose put() returned before stop() was called, then ends the
  // thread and returns. Records put later stay in the queue for a later start(). Harmless
  // when not running. If the queue is closed, the thread ends once it has drained it.
  // One listener per queue at a time: stop() puts a marker record that its thread, and
  // only its thread, recognizes.
  void stop();
  bool running() const noexcept;

  // Records written (given to the sinks) so far.
  std::uint64_t records() const noexcept;
  // Failures so far: a sink call that threw, a message that could not be decoded or
  // formatted. The listener reports them here and goes on with the next record.
  std::uint64_t failures() const noexcept;
  // What the first failure said ("" when there was none).
  std::string first_failure() const;

 private:
  struct State;
  bool forget_if_forked() noexcept;

  LogQueue queue_;
  std::shared_ptr<State> state_;
  std::unique_ptr<std::thread> thread_;  // null when not running
  pid_t owner_ = 0;                      // the process that started thread_
};

}  // namespace mp
