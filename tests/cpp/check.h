// The failure count, CHECK and exit status shared by the framework-free ctest
// programs (tests/cpp/test_*.cpp): a failed check prints where and why and the
// program goes on, so one run lists every failure.
#pragma once

#include <cstdio>

namespace kdext_check {

inline int failures = 0;

// main's exit status: 0 when every check passed.
inline int report(const char* suite) {
  if (failures) {
    std::printf("%s: %d failure(s)\n", suite, failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", suite);
  return 0;
}

}  // namespace kdext_check

// CHECK(cond, printf-format, ...): counts and reports a failed condition.
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++kdext_check::failures;                                    \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)
