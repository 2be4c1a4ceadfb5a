#include "io/npy.hpp"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>

#include "core/half.hpp"
#include "distgn/error.hpp"

// .npy data is little-endian and moves to and from memory as raw bytes.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "distgn's .npy I/O assumes a little-endian host");

namespace distgn::io {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;
// Real headers are a few hundred bytes; this bounds what a corrupt length
// field in a large file can make us allocate.
constexpr uint64_t kMaxHeaderSize = uint64_t(1) << 20;
// numpy aligns the data to this many bytes from the start of the file.
constexpr size_t kAlignment = 64;
// numpy leaves room to rewrite the first dimension in place with up to this
// many digits; padding the same way makes our files byte-identical to np.save's.
constexpr size_t kGrowthAxisMaxDigits = 21;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(path + ": " + what);
}

std::string errno_text(int err) { return err != 0 ? std::strerror(err) : "unknown error"; }

// Python's repr of the shape tuple: "()", "(3,)", "(2, 3)".
std::string shape_repr(const Shape& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  if (shape.size() == 1) text += ",";
  return text + ")";
}

// Bytes the data of a shape takes; false if they, or the bytes with every
// zero extent taken as 1, do not fit an int64: numpy accepts (2^32, 2^32, 0),
// but only a corrupt or hostile header holds it, and sizes computed from its
// other extents would overflow. Dimensions must be non-negative.
bool data_size(const Shape& shape, NpyType type, int64_t* size) {
  int64_t nonzero_bytes = npy_type_size(type);
  bool empty = false;
  for (int64_t d : shape) {
    if (d == 0) {
      empty = true;
    } else if (__builtin_mul_overflow(nonzero_bytes, d, &nonzero_bytes)) {
      return false;
    }
  }
  *size = empty ? 0 : nonzero_bytes;
  return true;
}

bool has_zero_extent(const Shape& shape) {
  for (int64_t d : shape) {
    if (d == 0) return true;
  }
  return false;
}

std::string describe(const Shape& shape, NpyType type) {
  return "shape " + shape_repr(shape) + " of " + npy_descr(type);
}

struct CloseFile {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using File = std::unique_ptr<std::FILE, CloseFile>;

// The header dict's values.
struct Header {
  std::string descr;
  bool fortran_order = false;
  Shape shape;
};

// Parses the subset of Python literals .npy headers use: what numpy writes,
// in any key order and spacing, plus Python 2's "3L" dimensions.
class HeaderParser {
 public:
  HeaderParser(const std::string& path, const std::string& text) : path_(path), text_(text) {}

  Header parse() {
    Header header;
    bool seen_descr = false, seen_fortran_order = false, seen_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (consume('}')) break;
      const std::string key = string_literal();
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr") {
        mark_seen(&seen_descr, key);
        if (peek() == '[') fail(path_, "unsupported dtype: structured arrays (a list of fields as descr) are not supported");
        header.descr = string_literal();
      } else if (key == "fortran_order") {
        mark_seen(&seen_fortran_order, key);
        header.fortran_order = bool_literal();
      } else if (key == "shape") {
        mark_seen(&seen_shape, key);
        header.shape = shape_tuple();
      } else {
        malformed("unexpected key '" + key + "'");
      }
      skip_space();
      if (consume(',')) continue;
      expect('}');
      break;
    }
    skip_space();
    if (pos_ != text_.size()) malformed("text after the closing '}'");
    if (!seen_descr) malformed("no 'descr'");
    if (!seen_fortran_order) malformed("no 'fortran_order'");
    if (!seen_shape) malformed("no 'shape'");
    return header;
  }

 private:
  [[noreturn]] void malformed(const std::string& what) const {
    std::string shown = text_;
    while (!shown.empty() && std::isspace(static_cast<unsigned char>(shown.back()))) shown.pop_back();
    if (shown.size() > 200) shown = shown.substr(0, 200) + "...";
    fail(path_, "malformed .npy header (" + what + "): " + shown);
  }

  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  void skip_space() {
    while (pos_ < text_.size() && std::strchr(" \t\r\n", text_[pos_]) != nullptr) ++pos_;
  }

  bool consume(char c) {
    if (pos_ >= text_.size() || text_[pos_] != c) return false;
    ++pos_;
    return true;
  }

  void expect(char c) {
    if (!consume(c)) malformed(std::string("expected '") + c + "'");
  }

  bool consume_word(const char* word) {
    const size_t n = std::strlen(word);
    if (text_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  void mark_seen(bool* seen, const std::string& key) {
    if (*seen) malformed("'" + key + "' given twice");
    *seen = true;
  }

  std::string string_literal() {
    const char quote = peek();
    if (quote != '\'' && quote != '"') malformed("expected a quoted string");
    ++pos_;
    std::string value;
    while (pos_ < text_.size() && text_[pos_] != quote) {
      if (text_[pos_] == '\\' && pos_ + 1 < text_.size()) ++pos_;
      value += text_[pos_++];
    }
    if (!consume(quote)) malformed("unterminated string");
    return value;
  }

  bool bool_literal() {
    if (consume_word("True")) return true;
    if (consume_word("False")) return false;
    malformed("'fortran_order' is not True or False");
  }

  // A tuple of dimensions; "(6)" is taken as "(6,)".
  Shape shape_tuple() {
    if (!consume('(')) malformed("'shape' is not a tuple");
    Shape shape;
    skip_space();
    while (!consume(')')) {
      shape.push_back(dimension());
      skip_space();
      if (consume(',')) {
        skip_space();
      } else if (peek() != ')') {
        malformed("expected ',' or ')' in 'shape'");
      }
    }
    return shape;
  }

  int64_t dimension() {
    const bool negative = consume('-');
    if (!std::isdigit(static_cast<unsigned char>(peek()))) malformed("expected a dimension in 'shape'");
    const size_t start = pos_;
    int64_t value = 0;
    bool too_large = false;
    while (std::isdigit(static_cast<unsigned char>(peek()))) {
      const int digit = text_[pos_++] - '0';
      if (value > (std::numeric_limits<int64_t>::max() - digit) / 10) too_large = true;
      if (!too_large) value = value * 10 + digit;
    }
    const std::string digits = text_.substr(start, pos_ - start);
    if (!consume('L')) consume('l');
    if (negative) fail(path_, "negative dimension -" + digits + " in the shape");
    if (too_large) fail(path_, "dimension " + digits + " in the shape does not fit a 64-bit integer");
    return value;
  }

  const std::string& path_;
  const std::string& text_;
  size_t pos_ = 0;
};

NpyType parse_descr(const std::string& path, const std::string& descr) {
  static const struct {
    const char* code;
    NpyType type;
  } kCodes[] = {
      {"f2", NpyType::f2}, {"f4", NpyType::f4}, {"f8", NpyType::f8}, {"b1", NpyType::b1},
      {"u1", NpyType::u1}, {"i1", NpyType::i1}, {"u2", NpyType::u2}, {"i2", NpyType::i2},
      {"u4", NpyType::u4}, {"i4", NpyType::i4}, {"u8", NpyType::u8}, {"i8", NpyType::i8},
  };
  if (descr.size() == 3) {
    for (const auto& code : kCodes) {
      if (descr.compare(1, 2, code.code) != 0) continue;
      const char order = descr[0];
      // Byte order means nothing for one-byte types; numpy writes '|'.
      if (npy_type_size(code.type) == 1 && std::strchr("|<>=", order) != nullptr) return code.type;
      if (order == '<') return code.type;
      if (order == '>') {
        fail(path, "big-endian dtype '" + descr + "' is not supported; save with a.astype('<" +
                       descr.substr(1) + "')");
      }
    }
  }
  fail(path, "unsupported dtype '" + descr +
                 "'; distgn reads <f2 <f4 <f8 |b1 |u1 |i1 <u2 <i2 <u4 <i4 <u8 <i8");
}

// Fortran and C order lay out the same bytes when at most one dimension is
// longer than 1 (e.g. any 1-D array), so such files are read as they are.
bool fortran_order_matters(const Shape& shape) {
  int long_dimensions = 0;
  for (int64_t d : shape) long_dimensions += d > 1;
  return long_dimensions > 1;
}

// Preamble (magic, version, header length) and padded header, as np.save
// writes them.
std::string preamble_and_header(const Shape& shape, NpyType type) {
  std::string dict = "{'descr': '" + npy_descr(type) + "', 'fortran_order': False, 'shape': " +
                     shape_repr(shape) + ", }";
  if (!shape.empty()) dict.append(kGrowthAxisMaxDigits - std::to_string(shape[0]).size(), ' ');
  // Always at least one space: numpy pads by 64 - (unpadded % 64), never 0.
  const auto padded_header_size = [&](size_t length_field_size) {
    const size_t unpadded = kMagicSize + 2 + length_field_size + dict.size() + 1;  // 1: '\n'
    return dict.size() + 1 + (kAlignment - unpadded % kAlignment);
  };
  // Version 2.0 only when the header outgrows 1.0's 16-bit length (thousands
  // of dimensions), as numpy does.
  const bool version1 = padded_header_size(2) <= 0xffff;
  const size_t length_field_size = version1 ? 2 : 4;
  const size_t header_size = padded_header_size(length_field_size);

  std::string out(kMagic, kMagicSize);
  out += char(version1 ? 1 : 2);
  out += char(0);
  for (size_t i = 0; i < length_field_size; ++i) out += char((header_size >> (8 * i)) & 0xff);
  out += dict;
  out.append(header_size - dict.size() - 1, ' ');
  out += '\n';
  return out;
}

template <class T>
T load(const NpyArray& a, int64_t i) {
  T value;
  std::memcpy(&value, a.bytes.data() + size_t(i) * sizeof(T), sizeof value);
  return value;
}

template <class T>
void store(std::vector<uint8_t>* out, int64_t i, T value) {
  std::memcpy(out->data() + size_t(i) * sizeof(T), &value, sizeof value);
}

// A 64-bit integer as double, rounded to odd: truncated, with the lowest bit
// set if anything was dropped. Rounding that again to any format of at most
// 51 significant bits gives the correctly rounded result.
double round_to_odd_double(uint64_t magnitude) {
  int dropped = 0;
  while ((magnitude >> dropped) >= (uint64_t(1) << 53)) ++dropped;
  uint64_t kept = magnitude >> dropped;
  if (dropped > 0 && (magnitude & ((uint64_t(1) << dropped) - 1)) != 0) kept |= 1;
  return std::ldexp(double(kept), dropped);
}

// Same for double to float, so float -> f16/bf16 afterwards rounds once.
// Overflow truncates to FLT_MAX (odd), which still rounds to inf in f16/bf16.
float round_to_odd_float(double d) {
  float f = float(d);
  if (std::isnan(d) || double(f) == d) return f;
  if (std::fabs(double(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  return bits_float(float_bits(f) | 1u);
}

// Element i exactly, except 64-bit integers beyond 2^53, which are rounded to
// odd so a later rounding to float or narrower is still correct.
double element_for_rounding(const NpyArray& a, int64_t i) {
  if (a.type == NpyType::u8) return round_to_odd_double(load<uint64_t>(a, i));
  if (a.type == NpyType::i8) {
    const int64_t v = load<int64_t>(a, i);
    const double magnitude = round_to_odd_double(v < 0 ? 0 - uint64_t(v) : uint64_t(v));
    return v < 0 ? -magnitude : magnitude;
  }
  return element_as_double(a, i);
}

int storage_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::f16: return 2;
    case DType::bf16: return 2;
  }
  throw Error("unknown DType");
}

// Element count of an array whose bytes match its shape (as read_npy makes
// them); a hand-built array that does not is rejected, not read past its end.
int64_t checked_size(const NpyArray& a) {
  int64_t bytes = 0;
  bool negative = false;
  for (int64_t d : a.shape) negative = negative || d < 0;
  if (negative || !data_size(a.shape, a.type, &bytes) || bytes != int64_t(a.bytes.size())) {
    throw Error("NpyArray holds " + std::to_string(a.bytes.size()) + " bytes, not the data of " +
                describe(a.shape, a.type));
  }
  return bytes / npy_type_size(a.type);
}

}  // namespace

int npy_type_size(NpyType type) {
  switch (type) {
    case NpyType::b1: case NpyType::u1: case NpyType::i1: return 1;
    case NpyType::f2: case NpyType::u2: case NpyType::i2: return 2;
    case NpyType::f4: case NpyType::u4: case NpyType::i4: return 4;
    case NpyType::f8: case NpyType::u8: case NpyType::i8: return 8;
  }
  throw Error("unknown NpyType");
}

std::string npy_descr(NpyType type) {
  switch (type) {
    case NpyType::f2: return "<f2";
    case NpyType::f4: return "<f4";
    case NpyType::f8: return "<f8";
    case NpyType::b1: return "|b1";
    case NpyType::u1: return "|u1";
    case NpyType::i1: return "|i1";
    case NpyType::u2: return "<u2";
    case NpyType::i2: return "<i2";
    case NpyType::u4: return "<u4";
    case NpyType::i4: return "<i4";
    case NpyType::u8: return "<u8";
    case NpyType::i8: return "<i8";
  }
  throw Error("unknown NpyType");
}

int64_t NpyArray::size() const { return element_count(shape); }

NpyArray read_npy(const std::string& path) {
  File file(std::fopen(path.c_str(), "rb"));
  if (!file) fail(path, "cannot open: " + errno_text(errno));
  struct stat status;
  if (fstat(fileno(file.get()), &status) != 0) fail(path, "cannot stat: " + errno_text(errno));
  // The size checks below need a size known up front.
  if (!S_ISREG(status.st_mode)) fail(path, "not a regular file");
  const uint64_t file_size = uint64_t(status.st_size);

  unsigned char preamble[12];
  const size_t got = std::fread(preamble, 1, 8, file.get());
  if (got < kMagicSize || std::memcmp(preamble, kMagic, kMagicSize) != 0) {
    fail(path, "not a .npy file (it does not start with \\x93NUMPY)");
  }
  if (got < 8) fail(path, "truncated header (the file ends inside the format version)");
  const int major = preamble[6], minor = preamble[7];
  if (major < 1 || major > 3 || minor != 0) {
    fail(path, "unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                   " (distgn reads 1.0, 2.0 and 3.0)");
  }
  const size_t length_field_size = major == 1 ? 2 : 4;
  if (std::fread(preamble + 8, 1, length_field_size, file.get()) != length_field_size) {
    fail(path, "truncated header (the file ends inside the header length)");
  }
  uint64_t header_size = 0;
  for (size_t i = 0; i < length_field_size; ++i) header_size |= uint64_t(preamble[8 + i]) << (8 * i);
  const uint64_t header_start = 8 + length_field_size;
  if (header_size > file_size - header_start) {
    fail(path, "truncated header (it should be " + std::to_string(header_size) + " bytes but the file has " +
                   std::to_string(file_size - header_start) + " after the preamble)");
  }
  if (header_size > kMaxHeaderSize) {
    fail(path, "header length " + std::to_string(header_size) + " is implausibly large; the file is corrupt");
  }
  std::string text(size_t(header_size), '\0');
  if (std::fread(&text[0], 1, text.size(), file.get()) != text.size()) {
    fail(path, "truncated header (the file ended while reading it)");
  }

  const Header header = HeaderParser(path, text).parse();
  const NpyType type = parse_descr(path, header.descr);
  if (header.fortran_order && fortran_order_matters(header.shape)) {
    fail(path, "Fortran-ordered arrays are not supported; save with np.ascontiguousarray");
  }
  int64_t expected = 0;
  if (!data_size(header.shape, type, &expected)) {
    fail(path, describe(header.shape, type) +
                   (has_zero_extent(header.shape)
                        ? " is too large: it has no elements, but its other extents multiply past 2^63 bytes, "
                          "which no real array does; the header is corrupt"
                        : " is too large (over 2^63 bytes)"));
  }
  const uint64_t available = file_size - header_start - header_size;
  if (available < uint64_t(expected)) {
    fail(path, "truncated data: " + describe(header.shape, type) + " needs " + std::to_string(expected) +
                   " bytes but the file holds " + std::to_string(available));
  }
  if (available > uint64_t(expected)) {
    fail(path, std::to_string(available - uint64_t(expected)) + " trailing bytes after the " +
                   std::to_string(expected) + " bytes of " + describe(header.shape, type) +
                   "; the file is corrupt or not a single array");
  }

  NpyArray array;
  array.shape = header.shape;
  array.type = type;
  array.bytes.resize(size_t(expected));
  if (std::fread(array.bytes.data(), 1, array.bytes.size(), file.get()) != array.bytes.size()) {
    if (std::ferror(file.get())) fail(path, "read error: " + errno_text(errno));
    fail(path, "truncated data (the file shrank while being read)");
  }
  return array;
}

namespace {

// The name a write to path lands on: path itself, or where its chain of
// symbolic links ends (an existing file, or the name a dangling link creates).
std::string link_target(const std::string& path) {
  std::string name = path;
  // The kernel's own limit (MAXSYMLINKS); also ends a loop made while we walk.
  for (int links = 0; links < 40; ++links) {
    struct stat status;
    if (lstat(name.c_str(), &status) != 0 || !S_ISLNK(status.st_mode)) return name;
    char buffer[PATH_MAX];
    const ssize_t length = readlink(name.c_str(), buffer, sizeof buffer);
    if (length < 0) fail(path, "cannot write: cannot read the symbolic link " + name + ": " + errno_text(errno));
    if (size_t(length) == sizeof buffer) fail(path, "cannot write: the symbolic link " + name + " is too long");
    const std::string link(buffer, size_t(length));
    // A relative link is relative to the directory holding it.
    name = link[0] == '/' ? link : name.substr(0, name.rfind('/') + 1) + link;
  }
  fail(path, "cannot write: too many levels of symbolic links");
}

// Writes the header and data to file and closes it; returns the errno of the
// first failure, 0 if none. sync: on disk before closing (regular files only;
// devices and pipes cannot fsync).
int write_and_close(std::FILE* file, const std::string& header, const void* data, int64_t size, bool sync) {
  int err = 0;
  const auto check = [&](bool ok) {
    if (!ok && err == 0) err = errno != 0 ? errno : EIO;
  };
  check(std::fwrite(header.data(), 1, header.size(), file) == header.size());
  if (err == 0 && size > 0) check(std::fwrite(data, 1, size_t(size), file) == size_t(size));
  if (err == 0) check(std::fflush(file) == 0);
  if (err == 0 && sync) check(fsync(fileno(file)) == 0);
  check(std::fclose(file) == 0);
  return err;
}

// A new file next to target, renamed over it: target is replaced atomically,
// and a failure never leaves a partial file under its name.
void write_replacing(const std::string& path, const std::string& target, const std::string& header,
                     const void* data, int64_t size) {
  const std::string temp_path = target + ".tmp." + std::to_string(getpid());
  std::FILE* file = std::fopen(temp_path.c_str(), "wb");
  if (file == nullptr) fail(path, "cannot write: cannot create " + temp_path + ": " + errno_text(errno));
  // On disk before the rename, so a crash cannot leave a complete-looking
  // name on an empty file.
  int err = write_and_close(file, header, data, size, true);
  if (err != 0) {
    std::remove(temp_path.c_str());
    fail(path, "cannot write " + temp_path + ": " + errno_text(err));
  }
  if (std::rename(temp_path.c_str(), target.c_str()) != 0) {
    err = errno;
    std::remove(temp_path.c_str());
    fail(path, "cannot rename " + temp_path + " to " + target + ": " + errno_text(err));
  }
}

// A device, FIFO or socket is written to, as a shell's `> path` does, never
// replaced by a regular file: it exists (no O_CREAT) and truncating means
// nothing to it. A FIFO's open waits for a reader.
void write_in_place(const std::string& path, const std::string& header, const void* data, int64_t size) {
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open for writing: " + errno_text(errno));
  std::FILE* file = fdopen(fd, "wb");
  if (file == nullptr) {
    const int err = errno;
    close(fd);
    fail(path, "cannot write: " + errno_text(err));
  }
  const int err = write_and_close(file, header, data, size, false);
  if (err != 0) fail(path, "cannot write: " + errno_text(err));
}

}  // namespace

void write_npy(const std::string& path, const Shape& shape, NpyType type, const void* data) {
  for (int64_t d : shape) {
    if (d < 0) fail(path, "cannot write shape " + shape_repr(shape) + ": negative dimension");
  }
  int64_t size = 0;
  if (!data_size(shape, type, &size)) fail(path, "cannot write " + describe(shape, type) + ": too large");
  if (size > 0 && data == nullptr) fail(path, "cannot write " + describe(shape, type) + ": no data given");
  const std::string header = preamble_and_header(shape, type);

  struct stat status;  // of what path names, through any symbolic links
  if (stat(path.c_str(), &status) == 0) {
    if (S_ISDIR(status.st_mode)) fail(path, "cannot write: it is a directory");
    if (!S_ISREG(status.st_mode)) {
      write_in_place(path, header, data, size);
      return;
    }
  } else if (errno != ENOENT) {
    fail(path, "cannot write: " + errno_text(errno));
  }
  write_replacing(path, link_target(path), header, data, size);
}

void write_npy(const std::string& path, const NpyArray& array) {
  checked_size(array);
  write_npy(path, array.shape, array.type, array.bytes.data());
}

double element_as_double(const NpyArray& a, int64_t i) {
  if (i < 0 || uint64_t(i) >= a.bytes.size() / uint64_t(npy_type_size(a.type))) {
    throw Error("element " + std::to_string(i) + " is out of range for " + describe(a.shape, a.type) +
                " holding " + std::to_string(a.bytes.size()) + " bytes");
  }
  switch (a.type) {
    case NpyType::f2: return to_float(half_t{load<uint16_t>(a, i)});
    case NpyType::f4: return load<float>(a, i);
    case NpyType::f8: return load<double>(a, i);
    case NpyType::b1: return load<uint8_t>(a, i) != 0 ? 1.0 : 0.0;
    case NpyType::u1: return load<uint8_t>(a, i);
    case NpyType::i1: return load<int8_t>(a, i);
    case NpyType::u2: return load<uint16_t>(a, i);
    case NpyType::i2: return load<int16_t>(a, i);
    case NpyType::u4: return load<uint32_t>(a, i);
    case NpyType::i4: return load<int32_t>(a, i);
    case NpyType::u8: return double(load<uint64_t>(a, i));
    case NpyType::i8: return double(load<int64_t>(a, i));
  }
  throw Error("unknown NpyType");
}

std::vector<uint8_t> convert_to(const NpyArray& a, DType dtype) {
  const int64_t count = checked_size(a);
  std::vector<uint8_t> out(size_t(count) * size_t(storage_size(dtype)));
  for (int64_t i = 0; i < count; ++i) {
    switch (dtype) {
      // A double rounds 64-bit integers correctly by itself; the rest are exact.
      case DType::f64: store(&out, i, element_as_double(a, i)); break;
      case DType::f32: store(&out, i, float(element_for_rounding(a, i))); break;
      case DType::f16: store(&out, i, to_half(round_to_odd_float(element_for_rounding(a, i))).bits); break;
      case DType::bf16: store(&out, i, to_bfloat16(round_to_odd_float(element_for_rounding(a, i))).bits); break;
    }
  }
  return out;
}

NpyType npy_type_for(DType dtype) {
  switch (dtype) {
    case DType::f32: return NpyType::f4;
    case DType::f64: return NpyType::f8;
    case DType::f16: return NpyType::f2;
    case DType::bf16: return NpyType::f4;
  }
  throw Error("unknown DType");
}

std::vector<uint8_t> to_mask(const NpyArray& a) {
  const int64_t count = checked_size(a);
  std::vector<uint8_t> mask(static_cast<size_t>(count));
  // != 0 is true for NaN, so NaN counts as valid; -0.0 does not.
  for (int64_t i = 0; i < count; ++i) mask[size_t(i)] = element_as_double(a, i) != 0.0 ? 1 : 0;
  return mask;
}

}  // namespace distgn::io
