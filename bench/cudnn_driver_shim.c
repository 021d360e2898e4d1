/* A stand-in CUDA driver library for asking cuDNN about a GPU on a machine without one (bench/cudnn_check.py).

   cuDNN considers its runtime-compiled engines only when it can load libcuda.so.1 and resolve these entry
   points; without a driver it reports NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING and offers fewer engines, so
   "no engine" could not be told from "not asked". With this library loaded first (under its soname, so cuDNN's
   dlopen finds it), heuristics and the support check consider every engine for the GPU the device properties
   describe. The driver version is CUDA 13.0's, the one those properties declare; every other entry point answers
   CUDA_ERROR_NO_DEVICE, so a runtime-compiled plan build stops at loading its module, after compiling it.
   Never loaded where a real driver library loads. Build: cc -shared -fPIC -Wl,-soname,libcuda.so.1 */
typedef int CUresult;
#define NO_DEVICE 100

CUresult cuDriverGetVersion(int *version) {
  *version = 13000;
  return 0;
}

#define NO_DEVICE_ENTRY(name) \
  CUresult name(void) { return NO_DEVICE; }

NO_DEVICE_ENTRY(cuInit)
NO_DEVICE_ENTRY(cuGetProcAddress)
NO_DEVICE_ENTRY(cuGetProcAddress_v2)
NO_DEVICE_ENTRY(cuGetErrorName)
NO_DEVICE_ENTRY(cuGetErrorString)
NO_DEVICE_ENTRY(cuDeviceGet)
NO_DEVICE_ENTRY(cuDeviceGetCount)
NO_DEVICE_ENTRY(cuCtxGetCurrent)
NO_DEVICE_ENTRY(cuCtxGetLimit)
NO_DEVICE_ENTRY(cuCtxPopCurrent)
NO_DEVICE_ENTRY(cuCtxPushCurrent)
NO_DEVICE_ENTRY(cuStreamGetCtx)
NO_DEVICE_ENTRY(cuLinkCreate)
NO_DEVICE_ENTRY(cuLinkAddData)
NO_DEVICE_ENTRY(cuLinkComplete)
NO_DEVICE_ENTRY(cuLinkDestroy)
NO_DEVICE_ENTRY(cuLibraryLoadData)
NO_DEVICE_ENTRY(cuLibraryLoadFromFile)
NO_DEVICE_ENTRY(cuLibraryGetKernel)
NO_DEVICE_ENTRY(cuLibraryUnload)
NO_DEVICE_ENTRY(cuKernelGetAttribute)
NO_DEVICE_ENTRY(cuKernelSetAttribute)
NO_DEVICE_ENTRY(cuLaunchKernel)
NO_DEVICE_ENTRY(cuLaunchKernelEx)
NO_DEVICE_ENTRY(cuLaunchCooperativeKernel)
NO_DEVICE_ENTRY(cuOccupancyMaxPotentialClusterSize)
