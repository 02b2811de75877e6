// torch_shim.cpp - the libtorch shim: the one C++ translation unit of fusion.
//
// It includes the narrowest torch header that gives THPVariable_Unpack
// (python_variable.h, about a third of the cost of torch/extension.h to
// compile) and turns a torch.Tensor PyObject into the plain C description in
// torch_shim.h. No C++ exception crosses the extern "C" boundary.
#include "torch_shim.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

#include <cstdio>
#include <exception>

#include "fold.h"

// The one place where the supported torch releases differ for the shim:
// torch 2.1 split data_ptr() into const_data_ptr() and mutable_data_ptr(), and
// the fold writes through the pointer, so it asks for the mutable one where it
// exists (it also materialises a copy-on-write storage before the write).
#if TORCH_VERSION_MAJOR > 2 ||                                                \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define FUSION_MUTABLE_DATA(t) ((t).mutable_data_ptr())
#else
#define FUSION_MUTABLE_DATA(t) ((t).data_ptr())
#endif

namespace {

int
to_fusion_dtype(c10::ScalarType t)
{
    switch (t) {
        case c10::ScalarType::Half:
            return FUSION_DTYPE_F16;
        case c10::ScalarType::BFloat16:
            return FUSION_DTYPE_BF16;
        case c10::ScalarType::Float:
            return FUSION_DTYPE_F32;
        case c10::ScalarType::Double:
            return FUSION_DTYPE_F64;
        default:
            return FUSION_DTYPE_NONE;
    }
}

void
copy_str(char *dst, size_t n, const std::string &s)
{
    std::snprintf(dst, n, "%s", s.c_str());
}

} // namespace

extern "C" int
fusion_shim_is_tensor(PyObject *obj)
{
    return THPVariable_Check(obj) ? 1 : 0;
}

extern "C" int
fusion_shim_describe(PyObject *obj, fusion_tensor_info *info, char *err,
                     size_t errlen)
{
    try {
        if (!THPVariable_Check(obj)) {
            std::snprintf(err, errlen, "expected a torch.Tensor, got %s",
                          Py_TYPE(obj)->tp_name);
            return -1;
        }
        const at::Tensor &t = THPVariable_Unpack(obj);
        *info = fusion_tensor_info{};
        info->dtype = to_fusion_dtype(t.scalar_type());
        copy_str(info->dtype_name, sizeof info->dtype_name,
                 std::string("torch.") + c10::toString(t.scalar_type()));
        copy_str(info->device_name, sizeof info->device_name,
                 t.device().str());
        info->is_cpu = t.device().is_cpu() ? 1 : 0;
        info->is_strided =
            (t.layout() == c10::kStrided && !t.is_quantized()) ? 1 : 0;
        info->ndim = static_cast<int>(t.dim());
        if (!info->is_strided) {
            return 0; // sizes only make sense for a dense strided tensor
        }
        if (info->ndim > FUSION_SHIM_MAX_DIMS) {
            std::snprintf(err, errlen,
                          "tensors of more than %d dims are not supported, "
                          "got %d",
                          FUSION_SHIM_MAX_DIMS, info->ndim);
            return -1;
        }
        for (int d = 0; d < info->ndim; d++) {
            info->sizes[d] = t.size(d);
            info->strides[d] = t.stride(d);
        }
        if (info->is_cpu && info->dtype != FUSION_DTYPE_NONE) {
            info->data = FUSION_MUTABLE_DATA(t);
            info->storage_offset = t.storage_offset();
            size_t itemsize = t.element_size();
            info->storage_numel =
                static_cast<int64_t>(t.storage().nbytes() / itemsize);
        }
        return 0;
    }
    catch (const std::exception &e) {
        std::snprintf(err, errlen, "%s", e.what());
        return -1;
    }
    catch (...) {
        std::snprintf(err, errlen, "unknown C++ exception");
        return -1;
    }
}

extern "C" void
fusion_shim_bump_version(PyObject *obj)
{
    try {
        if (THPVariable_Check(obj)) {
            const at::Tensor &t = THPVariable_Unpack(obj);
            t.unsafeGetTensorImpl()->bump_version();
        }
    }
    catch (...) {
        // Inference tensors carry no version counter; nothing to bump.
    }
}

extern "C" void *
fusion_shim_storage_retain(PyObject *obj)
{
    try {
        if (!THPVariable_Check(obj)) {
            return nullptr;
        }
        return new c10::Storage(THPVariable_Unpack(obj).storage());
    }
    catch (...) {
        return nullptr;
    }
}

extern "C" void
fusion_shim_storage_release(void *storage)
{
    delete static_cast<c10::Storage *>(storage);
}

extern "C" const void *
fusion_shim_storage_data(PyObject *obj)
{
    try {
        if (!THPVariable_Check(obj)) {
            return nullptr;
        }
        return THPVariable_Unpack(obj).storage().data();
    }
    catch (...) {
        return nullptr;
    }
}

#ifndef FUSION_TORCH_VERSION
#define FUSION_TORCH_VERSION "unknown"
#endif

// The same version as a marker in the file itself, which fusion/_native.py
// reads before loading the module: a build for another torch links that
// torch's libraries, and loading them beside the running torch's can abort
// the process in their initialisers, before Python could raise anything.
__attribute__((used)) static const char fusion_build_marker[] =
    "fusion-built-against-torch=" FUSION_TORCH_VERSION;

extern "C" const char *
fusion_shim_torch_version(void)
{
    return FUSION_TORCH_VERSION;
}
