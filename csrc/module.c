/*
 * module.c - fusion._C, the CPython module over the C core.
 *
 * This is the only file that touches PyObject (besides the shim's one unpack
 * function). It parses arguments, turns tensors into fusion_view through the
 * shim, calls the core, and turns status codes into Python exceptions.
 *
 * A fold runs in two steps so that the Python layer can be transactional:
 * prepare() validates everything and computes the fused bias into a Fold
 * object; Fold.apply() then writes, and has no failure path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdio.h>
#include <string.h>

#include "fold.h"
#include "torch_shim.h"

/* Folds of at least this many weight elements release the GIL. Below it the
 * fold takes microseconds and the GIL round trip would cost more than it
 * frees. The Fold object holds strong references to every tensor it
 * touches, so their storage outlives the unlocked section. */
#define FUSION_NOGIL_NUMEL (1 << 16)

typedef struct {
    PyObject *fold_error; /* fusion._C.FoldError, a ValueError */
    PyTypeObject *fold_type;
} module_state;

static module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------ */
/* Errors.                                                                   */

static const char *
status_code(fusion_status st)
{
    switch (st) {
        case FUSION_E_ARG:
            return "argument";
        case FUSION_E_DTYPE:
            return "dtype";
        case FUSION_E_SHAPE:
            return "shape";
        case FUSION_E_BOUNDS:
            return "bounds";
        case FUSION_E_NONFINITE:
            return "nonfinite";
        case FUSION_E_VARIANCE:
            return "variance";
        case FUSION_E_OVERFLOW:
            return "overflow";
        case FUSION_E_NOMEM:
            return "nomem";
        case FUSION_E_OVERLAP:
            return "overlap";
        default:
            return "unknown";
    }
}

/* Raises FoldError(message) with attributes code, what, index and value.
 * Always returns NULL. */
static PyObject *
raise_fold_error(module_state *state, const char *code, const char *what,
                 long long index, double value, const char *message)
{
    PyObject *exc = NULL, *attr = NULL;
    exc = PyObject_CallFunction(state->fold_error, "s", message);
    if (exc == NULL) {
        goto cleanup;
    }
    if ((attr = PyUnicode_FromString(code)) == NULL ||
        PyObject_SetAttrString(exc, "code", attr) < 0) {
        goto cleanup;
    }
    Py_CLEAR(attr);
    if ((attr = PyUnicode_FromString(what ? what : "")) == NULL ||
        PyObject_SetAttrString(exc, "what", attr) < 0) {
        goto cleanup;
    }
    Py_CLEAR(attr);
    if ((attr = PyLong_FromLongLong(index)) == NULL ||
        PyObject_SetAttrString(exc, "index", attr) < 0) {
        goto cleanup;
    }
    Py_CLEAR(attr);
    if ((attr = PyFloat_FromDouble(value)) == NULL ||
        PyObject_SetAttrString(exc, "value", attr) < 0) {
        goto cleanup;
    }
    Py_CLEAR(attr);
    PyErr_SetObject(state->fold_error, exc);
cleanup:
    Py_XDECREF(attr);
    Py_XDECREF(exc);
    return NULL;
}

static PyObject *
raise_status(module_state *state, fusion_status st, const fusion_where *w)
{
    char msg[256];
    const char *what = w->what ? w->what : "tensor";
    if (w->index >= 0) {
        snprintf(msg, sizeof msg, "%s: %s at index %lld (value %.17g)", what,
                 fusion_status_str(st), (long long)w->index, w->value);
    }
    else {
        snprintf(msg, sizeof msg, "%s: %s", what, fusion_status_str(st));
    }
    return raise_fold_error(state, status_code(st), what, w->index, w->value,
                            msg);
}

/* ------------------------------------------------------------------------ */
/* Tensors to views.                                                         */

/* Fills *view from a tensor, or leaves it absent for None when optional.
 * Returns 0, or -1 with FoldError set. */
static int
to_view(module_state *state, PyObject *obj, const char *name, int optional,
        fusion_view *view)
{
    fusion_tensor_info info;
    char err[256] = "";
    char msg[384];
    memset(view, 0, sizeof *view);
    if (obj == Py_None && optional) {
        return 0;
    }
    if (!fusion_shim_is_tensor(obj)) {
        snprintf(msg, sizeof msg, "%s: expected a torch.Tensor, got %s", name,
                 Py_TYPE(obj)->tp_name);
        raise_fold_error(state, "argument", name, -1, 0.0, msg);
        return -1;
    }
    if (fusion_shim_describe(obj, &info, err, sizeof err) < 0) {
        snprintf(msg, sizeof msg, "%s: %s", name, err);
        raise_fold_error(state, "argument", name, -1, 0.0, msg);
        return -1;
    }
    if (!info.is_strided) {
        snprintf(msg, sizeof msg,
                 "%s: a sparse or quantized tensor (%s) cannot be folded; "
                 "convert it to a dense float tensor first",
                 name, info.dtype_name);
        raise_fold_error(state, "dtype", name, -1, 0.0, msg);
        return -1;
    }
    if (info.dtype == FUSION_DTYPE_NONE) {
        snprintf(msg, sizeof msg,
                 "%s: dtype %s is not supported; expected float16, bfloat16, "
                 "float32 or float64",
                 name, info.dtype_name);
        raise_fold_error(state, "dtype", name, -1, 0.0, msg);
        return -1;
    }
    if (!info.is_cpu) {
        snprintf(msg, sizeof msg,
                 "%s: tensor is on device %s; the core folds host memory",
                 name, info.device_name);
        raise_fold_error(state, "device", name, -1, 0.0, msg);
        return -1;
    }
    view->data = info.data;
    view->dtype = (fusion_dtype)info.dtype;
    view->ndim = info.ndim;
    for (int d = 0; d < info.ndim; d++) {
        view->sizes[d] = info.sizes[d];
        view->strides[d] = info.strides[d];
    }
    view->lo = -info.storage_offset;
    view->hi = info.storage_numel - info.storage_offset;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The Fold object: a checked fold, ready to write.                          */

enum {
    REF_WEIGHT,
    REF_BIAS_IN,
    REF_BIAS_OUT,
    REF_MEAN,
    REF_VAR,
    REF_GAMMA,
    REF_BETA,
    REF_POST_MEAN,
    REF_POST_VAR,
    REF_POST_GAMMA,
    REF_POST_BETA,
    REF_COUNT
};

/* fold points into norm, post and the arrays below, all owned here. The
 * tensors are held (refs), and so are their storages: a tensor given another
 * storage after prepare() (Tensor.set_) cannot free the memory apply()
 * writes. */
typedef struct {
    PyObject_HEAD PyObject *refs[REF_COUNT];
    void *storages[REF_COUNT];
    const void *storage_data[REF_COUNT];
    fusion_view *views[REF_COUNT];
    fusion_fold fold;
    fusion_norm norm, post;
    double *arrays; /* scale, shift, post_scale, post_shift, new_bias */
    double *new_bias;
    int64_t numel;
    int applied;
} FoldObject;

static int
Fold_traverse(FoldObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    for (int i = 0; i < REF_COUNT; i++) {
        Py_VISIT(self->refs[i]);
    }
    return 0;
}

static int
Fold_clear(FoldObject *self)
{
    for (int i = 0; i < REF_COUNT; i++) {
        Py_CLEAR(self->refs[i]);
    }
    return 0;
}

static void
Fold_dealloc(FoldObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Fold_clear(self);
    for (int i = 0; i < REF_COUNT; i++) {
        fusion_shim_storage_release(self->storages[i]);
    }
    PyMem_Free(self->arrays);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* 1 when every tensor still has the data pointer, sizes, strides and
 * storage it had in prepare(), else 0. */
static int
fold_unchanged(FoldObject *self)
{
    for (int i = 0; i < REF_COUNT; i++) {
        const fusion_view *v = self->views[i];
        if (self->refs[i] == NULL || self->refs[i] == Py_None || v == NULL ||
            v->dtype == FUSION_DTYPE_NONE) {
            continue;
        }
        fusion_tensor_info info;
        char err[64];
        if (fusion_shim_describe(self->refs[i], &info, err, sizeof err) < 0 ||
            info.data != v->data || info.ndim != v->ndim ||
            fusion_shim_storage_data(self->refs[i]) != self->storage_data[i]) {
            return 0;
        }
        for (int d = 0; d < v->ndim; d++) {
            if (info.sizes[d] != v->sizes[d] ||
                info.strides[d] != v->strides[d]) {
                return 0;
            }
        }
    }
    return 1;
}

static PyObject *
Fold_unchanged(FoldObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(fold_unchanged(self));
}

/* Writes the fold. There is no failure path here: every check ran in
 * prepare(), and the memory written is held by this object. A tensor whose
 * layout changed since prepare() (which the caller rules out with
 * unchanged() before writing anything) is not written. A second call does
 * nothing. */
static PyObject *
Fold_apply(FoldObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->applied && fold_unchanged(self)) {
        self->applied = 1;
        if (self->numel >= FUSION_NOGIL_NUMEL) {
            Py_BEGIN_ALLOW_THREADS fusion_fold_apply(&self->fold,
                                                     self->new_bias);
            Py_END_ALLOW_THREADS
        }
        else {
            fusion_fold_apply(&self->fold, self->new_bias);
        }
        fusion_shim_bump_version(self->refs[REF_WEIGHT]);
        fusion_shim_bump_version(self->refs[REF_BIAS_OUT]);
    }
    Py_RETURN_NONE;
}

static PyObject *
Fold_get_applied(FoldObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->applied);
}

static PyObject *
Fold_get_numel(FoldObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong((long long)self->numel);
}

static PyMethodDef Fold_methods[] = {
    {"unchanged", (PyCFunction)Fold_unchanged, METH_NOARGS,
     "unchanged()\n--\n\nTrue when every tensor still has the storage, data "
     "pointer, sizes and strides it had in prepare()."},
    {"apply", (PyCFunction)Fold_apply, METH_NOARGS,
     "apply()\n--\n\nWrite the fused weight in place and the fused bias. "
     "Cannot fail; a second call does nothing."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Fold_getset[] = {
    {"applied", (getter)Fold_get_applied, NULL, "True once apply() ran.",
     NULL},
    {"numel", (getter)Fold_get_numel, NULL, "Weight elements the fold writes.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Fold_slots[] = {
    {Py_tp_doc,
     "A checked fold, ready to write. Made by fusion._C.prepare()."},
    {Py_tp_dealloc, Fold_dealloc},
    {Py_tp_traverse, Fold_traverse},
    {Py_tp_clear, Fold_clear},
    {Py_tp_methods, Fold_methods},
    {Py_tp_getset, Fold_getset},
    {0, NULL},
};

static PyType_Spec Fold_spec = {
    .name = "fusion._C.Fold",
    .basicsize = sizeof(FoldObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Fold_slots,
};

/* ------------------------------------------------------------------------ */
/* prepare()                                                                 */

PyDoc_STRVAR(
    prepare_doc,
    "prepare(weight, bias_in, bias_out, running_mean, running_var, "
    "norm_weight,\n"
    "        norm_bias, eps, before, grouped, groups, post_mean=None,\n"
    "        post_var=None, post_weight=None, post_bias=None, post_eps=0.0)\n"
    "--\n\n"
    "Check one fold and compute it, writing nothing.\n\n"
    "weight: the producer weight, folded in place by Fold.apply().\n"
    "bias_in: the producer bias, or None for none. bias_out: the tensor that\n"
    "receives the fused bias (may be bias_in). norm_weight and norm_bias may "
    "be\n"
    "None. before: the norm runs before the layer (fold into its inputs).\n"
    "grouped: channel c of element (i0, i1, ...) is (i0 // (d0 // groups)) *\n"
    "d1 + i1 instead of i0. post_*: with before, a second norm after the "
    "layer,\n"
    "folded in the same pass.\n\n"
    "Returns a Fold. Raises FoldError with .code, .what, .index and .value.");

/* Checks a norm's vectors against `channels` and computes its affine map.
 * Returns 0, or -1 with FoldError set. */
static int
norm_prepare(module_state *state, const char *label, fusion_norm *norm,
             int64_t channels, double *scale, double *shift)
{
    fusion_where where = {NULL, -1, 0.0};
    if (norm->mean.ndim != 1 || norm->mean.sizes[0] != channels) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "%srunning_mean: has %lld elements but the layer has %lld "
                 "channels",
                 label,
                 (long long)(norm->mean.ndim >= 1 ? norm->mean.sizes[0] : 0),
                 (long long)channels);
        raise_fold_error(state, "shape", "running_mean", -1, 0.0, msg);
        return -1;
    }
    fusion_status st =
        fusion_norm_affine(norm, channels, scale, shift, &where);
    if (st != FUSION_OK) {
        raise_status(state, st, &where);
        return -1;
    }
    return 0;
}

static PyObject *
prepare(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {
        "weight",      "bias_in",   "bias_out", "running_mean", "running_var",
        "norm_weight", "norm_bias", "eps",      "before",       "grouped",
        "groups",      "post_mean", "post_var", "post_weight",  "post_bias",
        "post_eps",    NULL};
    static const char *names[REF_COUNT] = {"weight",
                                           "bias",
                                           "bias",
                                           "running_mean",
                                           "running_var",
                                           "norm weight",
                                           "norm bias",
                                           "post running_mean",
                                           "post running_var",
                                           "post norm weight",
                                           "post norm bias"};
    static const int optional[REF_COUNT] = {0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1};
    module_state *state = get_state(module);
    PyObject *objs[REF_COUNT] = {NULL};
    double eps = 0.0, post_eps = 0.0;
    int before = 0, grouped = 0;
    long long groups = 1;
    FoldObject *self = NULL;
    fusion_where where = {NULL, -1, 0.0};
    fusion_view *views[REF_COUNT];
    PyObject *result = NULL;
    fusion_status st;

    for (int i = REF_POST_MEAN; i < REF_COUNT; i++) {
        objs[i] = Py_None;
    }
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOOOOOOdppL|OOOOd:prepare", kwlist,
            &objs[REF_WEIGHT], &objs[REF_BIAS_IN], &objs[REF_BIAS_OUT],
            &objs[REF_MEAN], &objs[REF_VAR], &objs[REF_GAMMA], &objs[REF_BETA],
            &eps, &before, &grouped, &groups, &objs[REF_POST_MEAN],
            &objs[REF_POST_VAR], &objs[REF_POST_GAMMA], &objs[REF_POST_BETA],
            &post_eps)) {
        return NULL;
    }
    self = PyObject_GC_New(FoldObject, state->fold_type);
    if (self == NULL) {
        goto cleanup;
    }
    memset(self->refs, 0, sizeof self->refs);
    memset(self->storages, 0, sizeof self->storages);
    memset(self->storage_data, 0, sizeof self->storage_data);
    memset(self->views, 0, sizeof self->views);
    memset(&self->fold, 0, sizeof self->fold);
    memset(&self->norm, 0, sizeof self->norm);
    memset(&self->post, 0, sizeof self->post);
    self->arrays = self->new_bias = NULL;
    self->numel = 0;
    self->applied = 0;
    PyObject_GC_Track((PyObject *)self);
    for (int i = 0; i < REF_COUNT; i++) {
        Py_INCREF(objs[i]);
        self->refs[i] = objs[i];
    }
    fusion_fold *fold = &self->fold;
    int has_post = objs[REF_POST_MEAN] != Py_None;
    views[REF_WEIGHT] = &fold->weight;
    views[REF_BIAS_IN] = &fold->bias_in;
    views[REF_BIAS_OUT] = &fold->bias_out;
    views[REF_MEAN] = &self->norm.mean;
    views[REF_VAR] = &self->norm.var;
    views[REF_GAMMA] = &self->norm.weight;
    views[REF_BETA] = &self->norm.bias;
    views[REF_POST_MEAN] = &self->post.mean;
    views[REF_POST_VAR] = &self->post.var;
    views[REF_POST_GAMMA] = &self->post.weight;
    views[REF_POST_BETA] = &self->post.bias;
    for (int i = 0; i < REF_COUNT; i++) {
        int opt = optional[i] || (i == REF_POST_VAR && !has_post);
        if (to_view(state, objs[i], names[i], opt, views[i]) < 0) {
            goto cleanup;
        }
        self->views[i] = views[i];
        if (objs[i] != Py_None) {
            self->storages[i] = fusion_shim_storage_retain(objs[i]);
            self->storage_data[i] = fusion_shim_storage_data(objs[i]);
            if (self->storages[i] == NULL) {
                raise_fold_error(state, "argument", names[i], -1, 0.0,
                                 "cannot hold the tensor's storage");
                goto cleanup;
            }
        }
    }
    if (has_post && !before) {
        raise_fold_error(state, "argument", "post", -1, 0.0,
                         "post: a second norm folds only with before=True");
        goto cleanup;
    }
    self->norm.eps = eps;
    self->post.eps = post_eps;
    fold->direction = before ? FUSION_NORM_BEFORE : FUSION_NORM_AFTER;
    fold->map = grouped ? FUSION_GROUPED : FUSION_AXIS0;
    fold->groups = groups;

    int64_t channels = fusion_fold_channels(fold);
    int64_t d_out = fusion_fold_out_channels(fold);
    if (fold->weight.ndim < 2 || channels == 0) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "weight: cannot fold a weight of %d dims with groups=%lld",
                 fold->weight.ndim, groups);
        raise_fold_error(state, "shape", "weight", -1, 0.0, msg);
        goto cleanup;
    }
    size_t nc = (size_t)channels, no = (size_t)(d_out > 0 ? d_out : 1);
    self->arrays = PyMem_Malloc((2 * nc + 3 * no) * sizeof(double));
    if (self->arrays == NULL) {
        PyErr_NoMemory();
        goto cleanup;
    }
    double *scale = self->arrays, *shift = scale + nc;
    double *post_scale = shift + nc, *post_shift = post_scale + no;
    self->new_bias = post_shift + no;
    if (norm_prepare(state, "", &self->norm, channels, scale, shift) < 0) {
        goto cleanup;
    }
    fold->norm = &self->norm;
    fold->scale = scale;
    fold->shift = shift;
    if (has_post) {
        if (norm_prepare(state, "post ", &self->post, d_out, post_scale,
                         post_shift) < 0) {
            goto cleanup;
        }
        fold->post = &self->post;
        fold->post_scale = post_scale;
        fold->post_shift = post_shift;
    }
    self->numel = 1;
    for (int d = 0; d < fold->weight.ndim; d++) {
        self->numel *= fold->weight.sizes[d];
    }
    if (self->numel >= FUSION_NOGIL_NUMEL) {
        Py_BEGIN_ALLOW_THREADS st =
            fusion_fold_check(fold, self->new_bias, &where);
        Py_END_ALLOW_THREADS
    }
    else {
        st = fusion_fold_check(fold, self->new_bias, &where);
    }
    if (st != FUSION_OK) {
        raise_status(state, st, &where);
        goto cleanup;
    }
    result = (PyObject *)self;
    self = NULL;
cleanup:
    Py_XDECREF(self);
    return result;
}

/* ------------------------------------------------------------------------ */
/* Module.                                                                   */

static PyMethodDef module_methods[] = {
    {"prepare", (PyCFunction)(void (*)(void))prepare,
     METH_VARARGS | METH_KEYWORDS, prepare_doc},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    module_state *state = get_state(module);
    state->fold_error = PyErr_NewExceptionWithDoc(
        "fusion._C.FoldError",
        "A fold failed its checks in the C core. Attributes: code, what, "
        "index, value.",
        PyExc_ValueError, NULL);
    if (state->fold_error == NULL) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "FoldError", state->fold_error) < 0) {
        return -1;
    }
    state->fold_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &Fold_spec, NULL);
    if (state->fold_type == NULL) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "Fold", (PyObject *)state->fold_type) <
        0) {
        return -1;
    }
    if (PyModule_AddStringConstant(module, "torch_version",
                                   fusion_shim_torch_version()) < 0) {
        return -1;
    }
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *state = get_state(module);
    Py_VISIT(state->fold_error);
    Py_VISIT(state->fold_type);
    return 0;
}

static int
module_clear(PyObject *module)
{
    module_state *state = get_state(module);
    Py_CLEAR(state->fold_error);
    Py_CLEAR(state->fold_type);
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fusion._C",
    .m_doc = "The native core of fusion: checked, exact, in-place folds.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__C(void)
{
    return PyModuleDef_Init(&module_def);
}
