// CHECK(cond, printf-style message) for the host test programs of csrc/tests: counts checks, prints the first
// failures; main() reports "all N checks passed" (and exits 0) or "F of N checks failed".
#pragma once

#include <cstdio>

static int g_checks = 0, g_failures = 0;

#define CHECK(cond, ...)                                                 \
  do {                                                                   \
    ++g_checks;                                                          \
    if (!(cond) && ++g_failures <= 30) {                                 \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond);       \
      std::printf(__VA_ARGS__);                                          \
      std::printf("\n");                                                 \
    }                                                                    \
  } while (0)

static int check_summary() {
  if (g_failures) {
    std::printf("%d of %d checks failed\n", g_failures, g_checks);
    return 1;
  }
  std::printf("all %d checks passed\n", g_checks);
  return 0;
}
