/* See moon3rt_runtime.h. The driver's entry points are resolved with dlsym from
 * libcuda.so.1 on first use: nothing links against libcuda, so the library needs no
 * driver until a kernel is launched. */
#include "moon3rt_runtime.h"

#include <cuda.h>
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

typedef CUresult (*fn_cuInit)(unsigned int);
typedef CUresult (*fn_cuCtxGetCurrent)(CUcontext *);
typedef CUresult (*fn_cuCtxGetDevice)(CUdevice *);
typedef CUresult (*fn_cuDeviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
typedef CUresult (*fn_cuModuleLoadData)(CUmodule *, const void *);
typedef CUresult (*fn_cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
typedef CUresult (*fn_cuFuncSetAttribute)(CUfunction, CUfunction_attribute, int);
typedef CUresult (*fn_cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                      unsigned, CUstream, void **, void **);

static struct {
    int state; /* 0 not tried, 1 ready, -1 failed */
    fn_cuInit init;
    fn_cuCtxGetCurrent ctx_get_current;
    fn_cuCtxGetDevice ctx_get_device;
    fn_cuDeviceGetAttribute device_get_attribute;
    fn_cuModuleLoadData module_load_data;
    fn_cuModuleGetFunction module_get_function;
    fn_cuFuncSetAttribute func_set_attribute;
    fn_cuLaunchKernel launch_kernel;
} driver;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Loaded functions, one per (kernel, context); a handful of kernels and contexts. */
#define MAX_LOADED 256
static struct {
    const moon3rt_kernel *kernel;
    CUcontext context;
    CUfunction function;
    int shared_bytes;
} loaded[MAX_LOADED];
static int num_loaded;

static int open_driver(void) {
    if (driver.state != 0) return driver.state == 1 ? MOON3RT_SUCCESS : MOON3RT_ERROR_NO_DRIVER;
    driver.state = -1;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return MOON3RT_ERROR_NO_DRIVER;
#define RESOLVE(field, symbol)                                  \
    *(void **)(&driver.field) = dlsym(lib, symbol);             \
    if (!driver.field) return MOON3RT_ERROR_NO_DRIVER;
    RESOLVE(init, "cuInit")
    RESOLVE(ctx_get_current, "cuCtxGetCurrent")
    RESOLVE(ctx_get_device, "cuCtxGetDevice")
    RESOLVE(device_get_attribute, "cuDeviceGetAttribute")
    RESOLVE(module_load_data, "cuModuleLoadData")
    RESOLVE(module_get_function, "cuModuleGetFunction")
    RESOLVE(func_set_attribute, "cuFuncSetAttribute")
    RESOLVE(launch_kernel, "cuLaunchKernel")
#undef RESOLVE
    if (driver.init(0) != CUDA_SUCCESS) return MOON3RT_ERROR_NO_DRIVER;
    driver.state = 1;
    return MOON3RT_SUCCESS;
}

int moon3rt_driver_available(void) {
    pthread_mutex_lock(&lock);
    int status = open_driver();
    pthread_mutex_unlock(&lock);
    return status == MOON3RT_SUCCESS;
}

/* The image for a device of compute capability `arch`: a cubin of the same major version
 * and the highest minor not above the device's (sm_90 cubins are sm_90a: exact match
 * only), else the PTX, which the driver compiles for any newer GPU. */
static const moon3rt_image *pick_image(const moon3rt_kernel *kernel, int arch) {
    const moon3rt_image *best = NULL, *ptx = NULL;
    for (int i = 0; i < kernel->num_images; ++i) {
        const moon3rt_image *image = &kernel->images[i];
        if (image->is_ptx) {
            if (image->arch <= arch && (!ptx || image->arch > ptx->arch)) ptx = image;
            continue;
        }
        int same_major = image->arch / 10 == arch / 10 && image->arch <= arch;
        if (image->arch == 90 && arch != 90) same_major = 0;
        if (same_major && (!best || image->arch > best->arch)) best = image;
    }
    return best ? best : ptx;
}

static int get_function(const moon3rt_kernel *kernel, CUfunction *out, int *shared_bytes) {
    CUcontext context = NULL;
    CUresult r = driver.ctx_get_current(&context);
    if (r != CUDA_SUCCESS) return (int)r;
    if (!context) return MOON3RT_ERROR_NO_CONTEXT;
    for (int i = 0; i < num_loaded; ++i) {
        if (loaded[i].kernel == kernel && loaded[i].context == context) {
            *out = loaded[i].function;
            *shared_bytes = loaded[i].shared_bytes;
            return MOON3RT_SUCCESS;
        }
    }
    CUdevice device;
    int major = 0, minor = 0;
    if ((r = driver.ctx_get_device(&device)) != CUDA_SUCCESS) return (int)r;
    driver.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
    driver.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
    const moon3rt_image *image = pick_image(kernel, major * 10 + minor);
    if (!image) return MOON3RT_ERROR_NO_IMAGE;
    CUmodule module;
    if ((r = driver.module_load_data(&module, image->data)) != CUDA_SUCCESS) return (int)r;
    CUfunction function;
    if ((r = driver.module_get_function(&function, module, kernel->entry)) != CUDA_SUCCESS) return (int)r;
    if (image->shared_bytes > 48 * 1024) { /* above the default limit: opt in, as Triton's launcher does */
        r = driver.func_set_attribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, image->shared_bytes);
        if (r != CUDA_SUCCESS) return (int)r;
    }
    if (num_loaded < MAX_LOADED) {
        loaded[num_loaded].kernel = kernel;
        loaded[num_loaded].context = context;
        loaded[num_loaded].function = function;
        loaded[num_loaded].shared_bytes = image->shared_bytes;
        ++num_loaded;
    }
    *out = function;
    *shared_bytes = image->shared_bytes;
    return MOON3RT_SUCCESS;
}

int moon3rt_launch(const moon3rt_kernel *kernel, moon3rt_stream stream, unsigned grid_x, unsigned grid_y,
                   unsigned grid_z, void **params) {
    pthread_mutex_lock(&lock);
    int status = open_driver();
    CUfunction function = NULL;
    int shared_bytes = 0;
    if (status == MOON3RT_SUCCESS) status = get_function(kernel, &function, &shared_bytes);
    pthread_mutex_unlock(&lock);
    if (status != MOON3RT_SUCCESS) return status;
    if (grid_x == 0 || grid_y == 0 || grid_z == 0) return MOON3RT_SUCCESS; /* nothing to do */
    /* Triton's hidden global/profile scratch pointers: these kernels use neither (size 0) */
    CUdeviceptr scratch = 0;
    void *args[64];
    int n = kernel->num_params + kernel->num_hidden;
    if (n > 64) return (int)CUDA_ERROR_INVALID_VALUE;
    memcpy(args, params, sizeof(void *) * (size_t)kernel->num_params);
    for (int i = kernel->num_params; i < n; ++i) args[i] = &scratch;
    CUresult r = driver.launch_kernel(function, grid_x, grid_y, grid_z, 32u * (unsigned)kernel->num_warps, 1, 1,
                                      (unsigned)shared_bytes, (CUstream)stream, args, NULL);
    return (int)r;
}

const char *moon3rt_error_string(int code) {
    switch (code) {
    case MOON3RT_SUCCESS: return "success";
    case MOON3RT_ERROR_NO_DRIVER: return "the CUDA driver (libcuda.so.1) could not be opened or initialised";
    case MOON3RT_ERROR_NO_CONTEXT: return "no current CUDA context on this thread";
    case MOON3RT_ERROR_NO_IMAGE: return "no cubin or PTX for this GPU's compute capability";
    default: return "CUDA driver error (see cuGetErrorString for the CUresult code)";
    }
}
