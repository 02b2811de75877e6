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

/* Sets attribute name of exc to value, stealing the reference. Returns 0, or
 * -1 with an exception set. */
static int
set_attr(PyObject *exc, const char *name, PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttrString(exc, name, value);
    Py_DECREF(value);
    return rc;
}

/* Raises FoldError(message) with attributes code, part, field, index and
 * value: where the check failed, as data (fold.h's fusion_where). Always
 * returns NULL. */
static PyObject *
raise_fold_error(module_state *state, const char *code, fusion_where where,
                 const char *message)
{
    PyObject *exc = PyObject_CallFunction(state->fold_error, "s", message);
    if (exc == NULL) {
        return NULL;
    }
    if (set_attr(exc, "code", PyUnicode_FromString(code)) == 0 &&
        set_attr(exc, "part",
                 PyUnicode_FromString(fusion_part_str(where.part))) == 0 &&
        set_attr(exc, "field",
                 PyUnicode_FromString(fusion_field_str(where.field))) == 0 &&
        set_attr(exc, "index", PyLong_FromLongLong(where.index)) == 0 &&
        set_attr(exc, "value", PyFloat_FromDouble(where.value)) == 0) {
        PyErr_SetObject(state->fold_error, exc);
    }
    Py_DECREF(exc);
    return NULL;
}

/* "norm running_var", "post bias", "weight": a field as a message names it. */
static void
field_label(fusion_where w, char *buf, size_t n)
{
    const char *part =
        w.part == FUSION_PART_LAYER ? "" : fusion_part_str(w.part);
    snprintf(buf, n, "%s%s%s", part, *part ? " " : "",
             *fusion_field_str(w.field) ? fusion_field_str(w.field) : "fold");
}

static PyObject *
raise_status(module_state *state, fusion_status st, fusion_where w)
{
    char msg[256], label[48];
    field_label(w, label, sizeof label);
    if (st == FUSION_E_SHAPE && w.index < 0 && w.value > 0) {
        snprintf(msg, sizeof msg, "%s: %s (a view of %.0f elements)", label,
                 fusion_status_str(st), w.value);
    }
    else if (w.index >= 0) {
        snprintf(msg, sizeof msg, "%s: %s at index %lld (value %.17g)", label,
                 fusion_status_str(st), (long long)w.index, w.value);
    }
    else {
        snprintf(msg, sizeof msg, "%s: %s", label, fusion_status_str(st));
    }
    return raise_fold_error(state, status_code(st), w, msg);
}

/* A FoldError about one argument as a whole. */
static PyObject *
raise_arg(module_state *state, const char *code, fusion_part part,
          fusion_field field, const char *message)
{
    fusion_where w = {part, field, -1, 0.0};
    return raise_fold_error(state, code, w, message);
}

/* ------------------------------------------------------------------------ */
/* Tensors to views.                                                         */

/* Fills *view from a tensor, or leaves it absent for None when optional.
 * Returns 0, or -1 with FoldError set, naming part and field. */
static int
to_view(module_state *state, PyObject *obj, fusion_part part,
        fusion_field field, int optional, fusion_view *view)
{
    fusion_tensor_info info;
    char err[256] = "", msg[384], label[48];
    fusion_where w = {part, field, -1, 0.0};
    memset(view, 0, sizeof *view);
    if (obj == Py_None && optional) {
        return 0;
    }
    field_label(w, label, sizeof label);
    const char *code = "argument";
    if (!fusion_shim_is_tensor(obj)) {
        snprintf(msg, sizeof msg, "%s: expected a torch.Tensor, got %s", label,
                 Py_TYPE(obj)->tp_name);
    }
    else if (fusion_shim_describe(obj, &info, err, sizeof err) < 0) {
        snprintf(msg, sizeof msg, "%s: %s", label, err);
    }
    else if (!info.is_strided) {
        code = "dtype";
        snprintf(msg, sizeof msg,
                 "%s: a sparse or quantized tensor (%s) cannot be folded; "
                 "convert it to a dense float tensor first",
                 label, info.dtype_name);
    }
    else if (info.dtype == FUSION_DTYPE_NONE) {
        code = "dtype";
        snprintf(msg, sizeof msg,
                 "%s: dtype %s is not supported; expected float16, bfloat16, "
                 "float32 or float64",
                 label, info.dtype_name);
    }
    else if (!info.is_cpu) {
        code = "device";
        snprintf(msg, sizeof msg,
                 "%s: tensor is on device %s; the core folds host memory",
                 label, info.device_name);
    }
    else {
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
    raise_fold_error(state, code, w, msg);
    return -1;
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
    REF_OUT,
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
    double *arrays; /* scale, new_bias, post_scale (with a post norm) */
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

/* Once applied, a fold needs nothing it holds: its per-channel arrays, its
 * tensors and their storages go at once, not when the last reference to the
 * object does (the report's), and the folded norms' tensors with them.
 * unchanged() is then true (there is nothing left to change). */
static void
fold_release(FoldObject *self)
{
    PyMem_Free(self->arrays);
    self->arrays = self->new_bias = NULL;
    self->fold.scale = self->fold.post_scale = NULL;
    for (int i = 0; i < REF_COUNT; i++) {
        fusion_shim_storage_release(self->storages[i]);
        self->storages[i] = NULL;
    }
    Fold_clear(self);
}

/* Writes the fold. There is no failure path here: every check ran in
 * prepare(), and the memory written is held by this object. A tensor whose
 * layout changed since prepare() (which the caller rules out with
 * unchanged() before writing anything) is not written. A second call does
 * nothing. */
static PyObject *
Fold_apply(FoldObject *self, PyObject *Py_UNUSED(ignored))
{
    /* (A Fold whose references were cleared by the collector writes nothing.)
     */
    if (!self->applied && self->refs[REF_WEIGHT] != NULL &&
        fold_unchanged(self)) {
        self->applied = 1;
        if (self->numel >= FUSION_NOGIL_NUMEL) {
            Py_BEGIN_ALLOW_THREADS fusion_fold_apply(&self->fold,
                                                     self->new_bias);
            Py_END_ALLOW_THREADS
        }
        else {
            fusion_fold_apply(&self->fold, self->new_bias);
        }
        int into_out = self->fold.out.dtype != FUSION_DTYPE_NONE;
        fusion_shim_bump_version(self->refs[into_out ? REF_OUT : REF_WEIGHT]);
        fusion_shim_bump_version(self->refs[REF_BIAS_OUT]);
        fold_release(self);
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
     "apply()\n--\n\nWrite the fused weight (in place, or into out) and "
     "the fused bias. Cannot fail; a second call does nothing."},
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
    "prepare(weight, bias_in, bias_out, norm, *, before, grouped, groups,\n"
    "        post=None, out=None)\n"
    "--\n\n"
    "Check one fold and compute it, writing nothing.\n\n"
    "weight: the layer weight, folded in place by Fold.apply().\n"
    "out: a tensor of weight's dtype, shape and strides, sharing no memory\n"
    "with it, that receives the fused weight instead (weight is then only\n"
    "read, and out's values never are).\n"
    "bias_in: the layer bias, or None. bias_out: the tensor that receives "
    "the\n"
    "fused bias (may be bias_in).\n"
    "norm: the norm, an object with running_mean, running_var, weight, bias\n"
    "(tensors; weight and bias may be None) and eps (a float), such as\n"
    "fusion.NormParams.\n"
    "before: the norm runs before the layer (fold into its inputs).\n"
    "grouped: channel c of element (i0, i1, ...) is (i0 // (d0 // groups)) *\n"
    "d1 + i1 instead of i0.\n"
    "post: with before, a second norm after the layer, folded in the same\n"
    "pass.\n\n"
    "Returns a Fold. Raises FoldError with .code, .part ('layer', 'norm',\n"
    "'post' or ''), .field ('weight', 'bias', 'running_mean', 'running_var',\n"
    "'eps', 'scale' or ''), .index and .value.");

/* A new, empty Fold, tracked by the GC. */
static FoldObject *
fold_new(module_state *state)
{
    FoldObject *self = PyObject_GC_New(FoldObject, state->fold_type);
    if (self == NULL) {
        return NULL;
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
    return self;
}

/* Holds obj (a tensor, or None where optional) as ref i, with its storage,
 * and describes it into view. Returns 0, or -1 with FoldError set. */
static int
hold(module_state *state, FoldObject *self, int i, PyObject *obj,
     fusion_part part, fusion_field field, int optional, fusion_view *view)
{
    Py_INCREF(obj);
    self->refs[i] = obj;
    if (to_view(state, obj, part, field, optional, view) < 0) {
        return -1;
    }
    self->views[i] = view;
    if (obj != Py_None) {
        self->storages[i] = fusion_shim_storage_retain(obj);
        self->storage_data[i] = fusion_shim_storage_data(obj);
        if (self->storages[i] == NULL) {
            raise_arg(state, "argument", part, field,
                      "cannot hold the tensor's storage");
            return -1;
        }
    }
    return 0;
}

/* Holds the tensors of a norm object (refs first .. first + 3) and reads its
 * eps. Returns 0, or -1 with an exception set. */
static int
hold_norm(module_state *state, FoldObject *self, PyObject *obj,
          fusion_part part, int first, fusion_norm *norm)
{
    static const char *attrs[4] = {"running_mean", "running_var", "weight",
                                   "bias"};
    static const fusion_field fields[4] = {FUSION_FIELD_MEAN, FUSION_FIELD_VAR,
                                           FUSION_FIELD_WEIGHT,
                                           FUSION_FIELD_BIAS};
    fusion_view *views[4] = {&norm->mean, &norm->var, &norm->weight,
                             &norm->bias};
    for (int k = 0; k < 4; k++) {
        PyObject *t = PyObject_GetAttrString(obj, attrs[k]);
        if (t == NULL) {
            return -1;
        }
        int rc =
            hold(state, self, first + k, t, part, fields[k], k >= 2, views[k]);
        Py_DECREF(t);
        if (rc < 0) {
            return -1;
        }
    }
    PyObject *eps = PyObject_GetAttrString(obj, "eps");
    if (eps == NULL) {
        return -1;
    }
    norm->eps = PyFloat_AsDouble(eps);
    Py_DECREF(eps);
    return norm->eps == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* Computes the norms' scales and checks the fold, into self's arrays.
 * Returns 0, or -1 with an exception set. */
static int
fold_compute(module_state *state, FoldObject *self)
{
    fusion_fold *fold = &self->fold;
    fusion_where where = {FUSION_PART_NONE, FUSION_FIELD_NONE, -1, 0.0};
    int64_t channels = fusion_fold_channels(fold);
    int64_t d_out = fusion_fold_out_channels(fold);
    if (fold->weight.ndim < 2 || channels == 0) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "weight: cannot fold a weight of %d dims with groups=%lld",
                 fold->weight.ndim, (long long)fold->groups);
        raise_arg(state, "shape", FUSION_PART_LAYER, FUSION_FIELD_WEIGHT, msg);
        return -1;
    }
    /* The scales, the new bias, and the post norm's scales where there is
     * one: kept until apply(), for every fold of a model at once. */
    size_t nc = (size_t)channels, no = (size_t)(d_out > 0 ? d_out : 1);
    size_t np = fold->post != NULL ? no : 0;
    self->arrays = PyMem_Malloc((nc + no + np) * sizeof(double));
    if (self->arrays == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    double *scale = self->arrays, *post_scale = scale + nc + no;
    self->new_bias = scale + nc;
    fusion_status st = fusion_norm_affine(&self->norm, FUSION_PART_NORM,
                                          channels, scale, NULL, &where);
    if (st == FUSION_OK && fold->post != NULL) {
        st = fusion_norm_affine(&self->post, FUSION_PART_POST, d_out,
                                post_scale, NULL, &where);
    }
    if (st != FUSION_OK) {
        raise_status(state, st, where);
        return -1;
    }
    fold->scale = scale;
    fold->post_scale = fold->post != NULL ? post_scale : NULL;
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
        raise_status(state, st, where);
        return -1;
    }
    return 0;
}

static PyObject *
prepare(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"weight", "bias_in", "bias_out", "norm",
                             "before", "grouped", "groups",   "post",
                             "out",    NULL};
    module_state *state = get_state(module);
    PyObject *weight, *bias_in, *bias_out, *norm, *post = Py_None,
                                                  *out = Py_None;
    int before = 0, grouped = 0;
    long long groups = 1;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOOO|$ppLOO:prepare", kwlist, &weight, &bias_in,
            &bias_out, &norm, &before, &grouped, &groups, &post, &out)) {
        return NULL;
    }
    if (post != Py_None && !before) {
        return raise_arg(state, "argument", FUSION_PART_POST,
                         FUSION_FIELD_NONE,
                         "post: a second norm folds only with before=True");
    }
    FoldObject *self = fold_new(state);
    if (self == NULL) {
        return NULL;
    }
    fusion_fold *fold = &self->fold;
    fold->direction = before ? FUSION_NORM_BEFORE : FUSION_NORM_AFTER;
    fold->map = grouped ? FUSION_GROUPED : FUSION_AXIS0;
    fold->groups = groups;
    fold->norm = &self->norm;
    fold->post = post != Py_None ? &self->post : NULL;
    if (hold(state, self, REF_WEIGHT, weight, FUSION_PART_LAYER,
             FUSION_FIELD_WEIGHT, 0, &fold->weight) < 0 ||
        hold(state, self, REF_OUT, out, FUSION_PART_LAYER, FUSION_FIELD_WEIGHT,
             1, &fold->out) < 0 ||
        hold(state, self, REF_BIAS_IN, bias_in, FUSION_PART_LAYER,
             FUSION_FIELD_BIAS, 1, &fold->bias_in) < 0 ||
        hold(state, self, REF_BIAS_OUT, bias_out, FUSION_PART_LAYER,
             FUSION_FIELD_BIAS, 0, &fold->bias_out) < 0 ||
        hold_norm(state, self, norm, FUSION_PART_NORM, REF_MEAN, &self->norm) <
            0 ||
        (post != Py_None && hold_norm(state, self, post, FUSION_PART_POST,
                                      REF_POST_MEAN, &self->post) < 0) ||
        fold_compute(state, self) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
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
        "A fold failed its checks in the C core. Attributes: code, part, "
        "field, index, value.",
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
