// mp/serialize.hpp - turning values into bytes that another process can turn back.
//
//   std::string bytes = mp::dumps(42, std::string("hi"), std::vector<int>{1, 2});
//   auto [n, s, v] = mp::loads<int, std::string, std::vector<int>>(bytes);
//
// Trivially copyable types (int, double, plain structs) are copied byte for byte: the fast
// path, unless they define cereal functions of their own. Everything else goes through
// cereal's binary archive, so a user type needs a
// serialize() member or function as cereal documents it; the standard containers and
// strings work out of the box. Pointers, references and views inside trivially copyable
// types are copied as addresses, which mean nothing in another process: don't send them.
//
// Objects that own a descriptor (a Lock, a Queue...) serialize the descriptor through the
// FdChannel below, so they can be passed to spawn and forkserver children.
#pragma once

#include <cereal/archives/binary.hpp>
#include <cereal/types/array.hpp>
#include <cereal/types/chrono.hpp>
#include <cereal/types/deque.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/utility.hpp>
#include <cereal/types/set.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/tuple.hpp>
#include <cereal/types/unordered_map.hpp>
#include <cereal/types/unordered_set.hpp>
#include <cereal/types/variant.hpp>
#include <cereal/types/vector.hpp>
#include <array>
#include <cstdint>
#include <cstring>
#include <istream>
#include <ostream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

namespace mp {

// Types that say how cereal should serialize them (serialize, or save and load, as members
// or free functions). They always go through cereal, even when trivially copyable: a handle
// that holds a descriptor number must translate it, not copy it.
// (cereal's own functions for numbers and std::array don't count: those are plain bytes.)
template <class T>
struct IsStdArray : std::false_type {};
template <class U, std::size_t N>
struct IsStdArray<std::array<U, N>> : std::true_type {};

template <class T>
concept HasCerealFunctions =
    std::is_class_v<T> && !IsStdArray<T>::value &&
    (cereal::traits::has_member_serialize<T, cereal::BinaryOutputArchive>::value ||
    cereal::traits::has_non_member_serialize<T, cereal::BinaryOutputArchive>::value ||
    cereal::traits::has_member_save<T, cereal::BinaryOutputArchive>::value ||
    cereal::traits::has_non_member_save<T, cereal::BinaryOutputArchive>::value);

// Types that take the memcpy fast path.
template <class T>
concept TriviallySerializable = std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> &&
                                !std::is_member_pointer_v<T> && !std::is_reference_v<T> &&
                                !HasCerealFunctions<T>;

// Malformed or truncated bytes.
class SerializationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// A streambuf that appends to a std::string (cereal writes to std::ostream).
class StringSink : public std::streambuf {
 public:
  explicit StringSink(std::string& out) : out_(out) {}

 protected:
  int_type overflow(int_type ch) override {
    if (ch != traits_type::eof()) out_.push_back(static_cast<char>(ch));
    return ch;
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    out_.append(s, static_cast<std::size_t>(n));
    return n;
  }

 private:
  std::string& out_;
};

// A streambuf reading from a byte range (cereal reads from std::istream).
class ViewSource : public std::streambuf {
 public:
  explicit ViewSource(std::string_view in) {
    char* p = const_cast<char*>(in.data());  // read only: the get area is never written
    setg(p, p, p + in.size());
  }
  std::size_t consumed() const noexcept { return static_cast<std::size_t>(gptr() - eback()); }
};

// Reads values back in the order they were written.
class Reader {
 public:
  explicit Reader(std::string_view bytes) noexcept : bytes_(bytes) {}
  std::string_view take(std::size_t n) {
    if (n > bytes_.size() - pos_) {
      throw SerializationError("cannot deserialize: the message is truncated");
    }
    std::string_view s = bytes_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  std::size_t remaining() const noexcept { return bytes_.size() - pos_; }

 private:
  std::string_view bytes_;
  std::size_t pos_ = 0;
};

template <class T>
void write_value(std::string& out, const T& v) {
  if constexpr (TriviallySerializable<T>) {
    out.append(reinterpret_cast<const char*>(&v), sizeof(T));
  } else {
    // Length-prefixed, so a reader can skip or bound it.
    std::size_t at = out.size();
    std::uint64_t len = 0;
    out.append(sizeof len, '\0');
    {
      StringSink sink(out);
      std::ostream os(&sink);
      cereal::BinaryOutputArchive ar(os);
      ar(v);
    }
    len = out.size() - at - sizeof len;
    std::memcpy(out.data() + at, &len, sizeof len);
  }
}

template <class T>
T read_value(Reader& in) {
  if constexpr (TriviallySerializable<T>) {
    std::string_view raw = in.take(sizeof(T));
    // Trivially copyable types are implicit-lifetime: memcpy into storage makes the object.
    alignas(T) unsigned char storage[sizeof(T)];
    std::memcpy(storage, raw.data(), sizeof(T));
    return *std::launder(reinterpret_cast<T*>(storage));
  } else {
    std::uint64_t len = 0;
    std::memcpy(&len, in.take(sizeof len).data(), sizeof len);
    std::string_view body = in.take(static_cast<std::size_t>(len));
    ViewSource src(body);
    std::istream is(&src);
    T v{};
    try {
      cereal::BinaryInputArchive ar(is);
      ar(v);
    } catch (const cereal::Exception& e) {
      throw SerializationError(std::string("cannot deserialize: ") + e.what());
    }
    return v;
  }
}

}  // namespace detail

// Appends the values to `out`.
template <class... Ts>
void dump_into(std::string& out, const Ts&... values) {
  (detail::write_value(out, values), ...);
}

// The values as bytes.
template <class... Ts>
std::string dumps(const Ts&... values) {
  std::string out;
  dump_into(out, values...);
  return out;
}

// The values back from bytes made by dumps<Ts...>. Throws SerializationError when the
// bytes are too short or have bytes left over.
template <class... Ts>
std::tuple<Ts...> loads(std::string_view bytes) {
  detail::Reader in(bytes);
  // Braced initialization evaluates left to right, matching the order of dumps().
  std::tuple<Ts...> values{detail::read_value<Ts>(in)...};
  if (in.remaining() != 0) {
    throw SerializationError("cannot deserialize: the message has bytes left over");
  }
  return values;
}

// One value back from bytes made by dumps(value).
template <class T>
T load(std::string_view bytes) {
  return std::get<0>(loads<T>(bytes));
}

// ---- FdChannel: descriptors that travel with serialized values --------------------------
//
// A value that owns a descriptor writes an index with export_fd() in its cereal save();
// the code that sends the bytes (a start method) opens an FdExport scope first and then
// passes exported() to the other process; there the receiver opens an FdImport scope with
// the descriptors it got, in the same order, and the value's load() calls import_fd().
namespace detail {

class FdExport {
 public:
  FdExport();
  ~FdExport();
  FdExport(const FdExport&) = delete;
  FdExport& operator=(const FdExport&) = delete;
  const std::vector<int>& exported() const noexcept { return fds_; }
  friend std::uint32_t export_fd(int fd);

 private:
  std::vector<int> fds_;
  FdExport* outer_;
};

class FdImport {
 public:
  explicit FdImport(std::vector<int> fds);
  ~FdImport();
  FdImport(const FdImport&) = delete;
  FdImport& operator=(const FdImport&) = delete;
  friend int import_fd(std::uint32_t index);

 private:
  std::vector<int> fds_;
  FdImport* outer_;
};

// Registers fd with the innermost FdExport of this thread and returns its index. Throws
// std::logic_error when there is none: such values can only be sent to a child that mp
// starts (as a Process argument), not through bytes that carry no descriptors.
std::uint32_t export_fd(int fd);

// The descriptor received for `index` in the innermost FdImport of this thread.
int import_fd(std::uint32_t index);

}  // namespace detail
}  // namespace mp
