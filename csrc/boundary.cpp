// lopt_kernels._C: the batched release of saved activations at the LoPT boundary.
//
// release_saved(candidates, keep, streams) returns the storage of every candidate that provably
// nothing but the candidates references, and leaves every other storage alone:
//   - candidates are the private tensors the BoundaryMemory pack hook made (one detach per saved
//     tensor), so the only TensorImpls that can hold a storage are the candidates themselves and
//     whatever else in the program shares it (a parameter, its .grad, the boundary tensor, a view
//     a user kept, a storage object);
//   - a storage is released only if its use count equals the number of distinct candidate
//     TensorImpls on it, it is not the storage of a tensor in `keep`, it is resizable (allocated by
//     a torch allocator, not from_blob or IPC memory) and not copy-on-write.
// Release swaps the storage's DataPtr for an empty one, as `untyped_storage().resize_(0)` does;
// the old DataPtr goes back to the allocator. The CUDA caching allocator frees stream-ordered on
// the allocation stream; every other stream that used the memory (those passed in `streams`) is
// recorded first, so the block is not reused before work queued on those streams finishes.
#include <ATen/core/Tensor.h>
#include <c10/core/impl/COW.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>  // lighter than torch/extension.h: half the compile time

#include <cstdint>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

using StreamKey = std::tuple<int64_t, int64_t, int64_t>;  // (stream_id, device_index, device_type)

bool releasable(c10::StorageImpl& impl) {
  return impl.resizable() && impl.nbytes() > 0 && !impl.received_cuda() &&
      !c10::impl::cow::is_cow_data_ptr(impl.data_ptr());
}

// Returns, per candidate, whether its storage was released, and the bytes released in all.
std::tuple<std::vector<bool>, int64_t> release_saved(
    const std::vector<at::Tensor>& candidates,
    const std::vector<at::Tensor>& keep,
    const std::vector<StreamKey>& streams) {
  std::unordered_set<const c10::StorageImpl*> kept;
  for (const auto& t : keep) {
    if (t.defined() && t.has_storage()) {
      kept.insert(t.storage().unsafeGetStorageImpl());
    }
  }

  // Group the candidates by storage; count each TensorImpl once.
  std::vector<c10::StorageImpl*> order;
  std::unordered_map<c10::StorageImpl*, std::vector<size_t>> members;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const auto& t = candidates[i];
    if (!t.defined() || !t.has_storage()) {
      continue;
    }
    auto* impl = t.storage().unsafeGetStorageImpl();
    auto [it, fresh] = members.try_emplace(impl);
    if (fresh) {
      order.push_back(impl);
    }
    it->second.push_back(i);
  }

  std::vector<bool> released(candidates.size(), false);
  int64_t released_bytes = 0;
  for (auto* impl : order) {
    const auto& idx = members[impl];
    std::unordered_set<const c10::TensorImpl*> owners;
    for (size_t i : idx) {
      owners.insert(candidates[i].unsafeGetTensorImpl());
    }
    const auto& storage = candidates[idx.front()].storage();
    if (kept.count(impl) || storage.use_count() != owners.size() || !releasable(*impl)) {
      continue;
    }
    const c10::Device device = impl->device();
    if (device.is_cuda()) {
      for (const auto& [stream_id, device_index, device_type] : streams) {
        if (device_index == device.index()) {
          c10::cuda::CUDACachingAllocator::recordStream(
              impl->data_ptr(),
              c10::cuda::CUDAStream(c10::Stream::unpack3(
                  stream_id,
                  static_cast<c10::DeviceIndex>(device_index),
                  static_cast<c10::DeviceType>(device_type))));
        }
      }
    }
    released_bytes += static_cast<int64_t>(impl->nbytes());
    at::DataPtr old = impl->set_data_ptr(at::DataPtr(nullptr, device));
    impl->set_nbytes(0);
    old.clear();  // back to the allocator now
    for (size_t i : idx) {
      released[i] = true;
    }
  }
  return {released, released_bytes};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LoPT boundary memory: batched, stream-aware release of saved activations";
  m.def(
      "release_saved",
      &release_saved,
      py::arg("candidates"),
      py::arg("keep"),
      py::arg("streams"),
      py::call_guard<py::gil_scoped_release>(),
      "Release the storage of every candidate that nothing outside the candidates references; "
      "returns (released flags per candidate, bytes released).");
}
