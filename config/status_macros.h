// Status propagation macros used across kvwave. config/ is the root of the module graph, so the
// macros live here and every module can use them.
//
// KVWAVE_RETURN_IF_ERROR(expr): evaluates an absl::Status expression, returns it if not OK.
// KVWAVE_ASSIGN_OR_RETURN(lhs, expr): evaluates an absl::StatusOr<T>, returns its status if not
// OK, otherwise moves the value into `lhs` (which may be a declaration: `auto x`).
#ifndef KVWAVE_CONFIG_STATUS_MACROS_H_
#define KVWAVE_CONFIG_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVWAVE_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status kvwave_status_ = (expr);          \
    if (!kvwave_status_.ok()) return kvwave_status_; \
  } while (0)

#define KVWAVE_STATUS_CONCAT_INNER_(a, b) a##b
#define KVWAVE_STATUS_CONCAT_(a, b) KVWAVE_STATUS_CONCAT_INNER_(a, b)

#define KVWAVE_ASSIGN_OR_RETURN(lhs, expr) \
  KVWAVE_ASSIGN_OR_RETURN_IMPL_(KVWAVE_STATUS_CONCAT_(kvwave_statusor_, __LINE__), lhs, expr)

#define KVWAVE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

// A broken invariant (a bug, never bad input) aborts with a message.
#define KVWAVE_CHECK(cond)                                                 \
  do {                                                                     \
    if (!(cond)) ::kvwave::config::CheckFailed(__FILE__, __LINE__, #cond); \
  } while (0)

namespace kvwave::config {
[[noreturn]] void CheckFailed(const char* file, int line, const char* condition);
}  // namespace kvwave::config

#endif  // KVWAVE_CONFIG_STATUS_MACROS_H_
