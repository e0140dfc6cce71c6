/* Loading and launching moon3rt's ahead-of-time compiled Triton kernels with the CUDA
 * driver API. The driver (libcuda.so.1) is opened with dlopen at the first launch, so the
 * library loads, and reports what it holds, on a machine without a GPU or a driver. */
#ifndef MOON3RT_RUNTIME_H
#define MOON3RT_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes: 0 is success, positive values are CUresult codes from the driver,
 * negative values are moon3rt's own. */
#define MOON3RT_SUCCESS 0
#define MOON3RT_ERROR_NO_DRIVER (-1)   /* libcuda.so.1 could not be opened or lacks a symbol */
#define MOON3RT_ERROR_NO_CONTEXT (-2)  /* no current CUDA context on the calling thread */
#define MOON3RT_ERROR_NO_IMAGE (-3)    /* no cubin or PTX for this GPU's compute capability */

typedef uint64_t moon3rt_devptr; /* a CUdeviceptr */
typedef void *moon3rt_stream;    /* a CUstream (NULL: the legacy default stream) */

/* One compiled image of a kernel: a cubin for one compute capability, or PTX. Triton
 * lays out shared memory per arch, so the launch's dynamic shared memory is per image. */
typedef struct {
    int arch;                    /* compute capability x10 (90 = sm_90) */
    int is_ptx;                  /* 1: PTX text (NUL-terminated), 0: cubin */
    int shared_bytes;            /* dynamic shared memory per block */
    const unsigned char *data;
    size_t size;
} moon3rt_image;

/* A kernel variant: one Triton kernel with its constexprs fixed. */
typedef struct {
    const char *name;            /* C launch function, e.g. moon3rt_fire_prologue_fp32_r16 */
    const char *entry;           /* entry symbol in the images */
    const char *signature;       /* runtime parameters, e.g. "*fp32 z_ptr, i32 stride_zn, ..." */
    int num_params;              /* runtime parameters the C function takes */
    int num_hidden;              /* trailing scratch pointers Triton adds (passed as 0) */
    int num_warps;
    int num_images;
    const moon3rt_image *images;
} moon3rt_kernel;

/* Launch `kernel` on the current context's device with `params` (one pointer per
 * runtime parameter, as cuLaunchKernel takes them); the scratch pointers are added here.
 * Modules are loaded once per kernel and context. Thread safe. */
int moon3rt_launch(const moon3rt_kernel *kernel, moon3rt_stream stream, unsigned grid_x, unsigned grid_y,
                   unsigned grid_z, void **params);

/* 1 if the CUDA driver library can be opened (it is not opened before this or a launch). */
int moon3rt_driver_available(void);

/* Human-readable text for a return code. */
const char *moon3rt_error_string(int code);

#ifdef __cplusplus
}
#endif
#endif
