// `--backend`: which backend the tool runs the layer on, and the device
// copies of its host arrays for the CUDA one.
#include "cli/cli.hpp"
#include "distgn/error.hpp"

namespace distgn::cli {

bool cuda_backend_requested(const std::string& backend) {
  if (backend != "cpu" && backend != "cuda") throw Error("--backend " + backend + ": use cpu or cuda");
#if !DISTGN_WITH_CUDA
  if (backend == "cuda")
    throw Error("--backend cuda: this build of distgn has no CUDA backend (no CUDA compiler was found)");
#endif
  return backend == "cuda";
}

#if DISTGN_WITH_CUDA
TensorView device_view(const HostArray& host, Layout layout, cuda::DeviceArray& storage, bool copy) {
  storage = cuda::DeviceArray(host.bytes.size());
  if (copy) storage.upload(host.bytes.data(), host.bytes.size());
  return {storage.data(), host.shape, host.dtype, layout, Device::cuda};
}
#endif

}  // namespace distgn::cli
