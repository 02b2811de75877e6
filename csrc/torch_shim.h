/*
 * torch_shim.h - the C view of a torch tensor.
 *
 * torch_shim.cpp is the only C++ translation unit of fusion and the only one
 * that includes torch headers. It exposes, through extern "C", exactly what
 * the C module needs from a tensor: its data pointer, dtype, device, layout,
 * sizes, strides and storage extent, plus a bump of the autograd version
 * counter after an in-place write.
 */
#ifndef FUSION_TORCH_SHIM_H
#define FUSION_TORCH_SHIM_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FUSION_SHIM_MAX_DIMS 8

typedef struct {
    void *data;           /* element (0, ..., 0) */
    int dtype;            /* a fusion_dtype; 0 for any other dtype */
    char dtype_name[32];  /* e.g. "torch.float16", for messages */
    int is_cpu;           /* 1 when the tensor is in host memory */
    char device_name[32]; /* e.g. "cpu", "cuda:0", "meta" */
    int is_strided;       /* dense strided layout, not quantized */
    int ndim;
    int64_t sizes[FUSION_SHIM_MAX_DIMS];
    int64_t strides[FUSION_SHIM_MAX_DIMS]; /* in elements */
    int64_t storage_offset;                /* in elements */
    int64_t storage_numel;                 /* elements the storage holds */
} fusion_tensor_info;

/* 1 if obj is a torch.Tensor (a Parameter included), else 0. */
int fusion_shim_is_tensor(PyObject *obj);

/* Fills *info for the tensor obj. Returns 0 on success; on failure returns -1
 * and writes a message into err (errlen bytes). Sets no Python exception. */
int fusion_shim_describe(PyObject *obj, fusion_tensor_info *info, char *err,
                         size_t errlen);

/* Marks obj as modified in place for autograd. Never fails: a tensor without
 * a version counter (an inference tensor) is left as it is. */
void fusion_shim_bump_version(PyObject *obj);

/* A strong reference to the storage of tensor obj, or NULL (no exception is
 * set). While held, the memory a prepared fold will write stays allocated
 * even if the tensor is given another storage (Tensor.set_). */
void *fusion_shim_storage_retain(PyObject *obj);

/* Drops a reference from fusion_shim_storage_retain (NULL is ignored). */
void fusion_shim_storage_release(void *storage);

/* The address of the first byte of the storage of obj now, or NULL. Compared
 * with the address at prepare time, it shows a storage reallocated in place
 * (Tensor.resize_). */
const void *fusion_shim_storage_data(PyObject *obj);

/* The torch version the shim was compiled against, e.g. "1.13.0". */
const char *fusion_shim_torch_version(void);

#ifdef __cplusplus
}
#endif

#endif /* FUSION_TORCH_SHIM_H */
