#include "rpc/session.h"

#include <algorithm>

namespace kvwave::rpc {

void Session::AddContext(engine::ContextId id, const store::ModelShape& shape) {
  absl::MutexLock lock(&mu_);
  contexts_[id] = shape;
}

std::optional<store::ModelShape> Session::Shape(engine::ContextId id) const {
  absl::MutexLock lock(&mu_);
  auto it = contexts_.find(id);
  if (it == contexts_.end()) return std::nullopt;
  return it->second;
}

bool Session::RemoveContext(engine::ContextId id) {
  absl::MutexLock lock(&mu_);
  return contexts_.erase(id) > 0;
}

std::vector<engine::ContextId> Session::TakeContexts() {
  absl::MutexLock lock(&mu_);
  std::vector<engine::ContextId> ids;
  ids.reserve(contexts_.size());
  for (const auto& [id, shape] : contexts_) ids.push_back(id);
  contexts_.clear();
  return ids;
}

std::vector<engine::ContextId> Session::ContextIds() const {
  std::vector<engine::ContextId> ids;
  {
    absl::MutexLock lock(&mu_);
    ids.reserve(contexts_.size());
    for (const auto& [id, shape] : contexts_) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

size_t Session::context_count() const {
  absl::MutexLock lock(&mu_);
  return contexts_.size();
}

uint64_t Session::AddDevice(std::shared_ptr<DeviceRegistration> reg) {
  absl::MutexLock lock(&mu_);
  if (devices_.size() >= kMaxDeviceRegistrations) return 0;
  const uint64_t id = next_device_++;
  devices_[id] = std::move(reg);
  return id;
}

std::shared_ptr<DeviceRegistration> Session::Device(uint64_t id) const {
  absl::MutexLock lock(&mu_);
  auto it = devices_.find(id);
  return it == devices_.end() ? nullptr : it->second;
}

std::shared_ptr<DeviceRegistration> Session::RemoveDevice(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = devices_.find(id);
  if (it == devices_.end()) return nullptr;
  std::shared_ptr<DeviceRegistration> reg = std::move(it->second);
  devices_.erase(it);
  return reg;
}

std::vector<std::shared_ptr<DeviceRegistration>> Session::TakeDevices() {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<DeviceRegistration>> out;
  for (auto& [id, reg] : devices_) out.push_back(std::move(reg));
  devices_.clear();
  return out;
}

}  // namespace kvwave::rpc
