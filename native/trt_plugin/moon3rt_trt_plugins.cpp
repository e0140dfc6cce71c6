// libmoon3rt_trt_plugins: the four custom ops of the plugin graph (export/plugins.py) as
// TensorRT 10 IPluginV3 plugins whose enqueue calls libmoon3rt_kernels' C launch functions.
// Same names, version "1", namespace "moon3rt" and attributes as export/plugins.py. Loaded
// dynamically (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins) through getCreators;
// the library uses no libnvinfer symbol, so it links only libmoon3rt_kernels.
//
// Tensor types, one letter per input then per output ('|' between): x = the activation
// dtype (fp32, bf16 or fp16: those compiled into libmoon3rt_kernels, MOON3RT_DTYPES),
// f = fp32, i = int32, l = int64. All tensors are linear (row-major, contiguous).
#include <NvInferRuntime.h>

#include <cstring>

#include "moon3rt_kernels.h"

using namespace nvinfer1;

namespace
{
char const* const kNamespace = "moon3rt";
char const* const kVersion = "1";

// ---------------------------------------------------------------- kernel variant tables
// [block][dtype] -> launch function, nullptr where MOON3RT_DTYPES left the dtype out. Assigning
// each function to a typed pointer checks the generated prototypes against the calls below.
#ifdef MOON3RT_HAS_FP32
#define MOON3RT_FP32(kernel, block) moon3rt_##kernel##_fp32_##block
#else
#define MOON3RT_FP32(kernel, block) nullptr
#endif
#ifdef MOON3RT_HAS_BF16
#define MOON3RT_BF16(kernel, block) moon3rt_##kernel##_bf16_##block
#else
#define MOON3RT_BF16(kernel, block) nullptr
#endif
#ifdef MOON3RT_HAS_FP16
#define MOON3RT_FP16(kernel, block) moon3rt_##kernel##_fp16_##block
#else
#define MOON3RT_FP16(kernel, block) nullptr
#endif
#define MOON3RT_VARIANTS(kernel, block)                                                                               \
    {                                                                                                                  \
        MOON3RT_FP32(kernel, block), MOON3RT_BF16(kernel, block), MOON3RT_FP16(kernel, block)                         \
    }

using devptr = moon3rt_devptr;
using PrologueFn = int (*)(moon3rt_stream, unsigned, unsigned, unsigned, devptr z, int32_t stride_zn, devptr norm,
    devptr w, int32_t stride_wr, devptr out, int32_t stride_on, int32_t N, int32_t K, int32_t RANK, float eps);
using InjectFn = int (*)(moon3rt_stream, unsigned, unsigned, unsigned, devptr hidden, int32_t stride_ht, devptr rows,
    devptr r, int32_t stride_rn, devptr up, int32_t stride_uk, devptr scale, int32_t N, int32_t RANK, int32_t DIM);
using ScoresFn = int (*)(moon3rt_stream, unsigned, unsigned, unsigned, devptr q, int32_t stride_qb,
    int32_t stride_qh, devptr x_img, int32_t stride_img_n, devptr cu_img, devptr s_img, devptr x_txt,
    int32_t stride_txt_n, devptr cu_txt, devptr s_txt, devptr row_max, devptr row_sum, int32_t H, int32_t D,
    int32_t N_img, int32_t N_txt);
using PoolFn = int (*)(moon3rt_stream, unsigned, unsigned, unsigned, devptr x_img, int32_t stride_img_n,
    devptr cu_img, devptr s_img, devptr x_txt, int32_t stride_txt_n, devptr cu_txt, devptr s_txt, devptr row_max,
    devptr row_sum, devptr gate, int32_t stride_gb, int32_t stride_gh, devptr out, int32_t stride_ob,
    int32_t stride_oh, int32_t H, int32_t D, int32_t N_img, int32_t N_txt);

PrologueFn const kPrologue[3][3] = {MOON3RT_VARIANTS(fire_prologue, r16), MOON3RT_VARIANTS(fire_prologue, r32),
    MOON3RT_VARIANTS(fire_prologue, r64)};
InjectFn const kInject[3][3] = {MOON3RT_VARIANTS(fire_inject, r16), MOON3RT_VARIANTS(fire_inject, r32),
    MOON3RT_VARIANTS(fire_inject, r64)};
ScoresFn const kScores[2][3] = {MOON3RT_VARIANTS(fusion_scores, h16), MOON3RT_VARIANTS(fusion_scores, h32)};
PoolFn const kPool[2][3] = {MOON3RT_VARIANTS(fusion_pool, h16), MOON3RT_VARIANTS(fusion_pool, h32)};

int dtypeIndex(DataType t) // column of the tables, -1 for a type no kernel takes as activation
{
    return t == DataType::kFLOAT ? 0 : t == DataType::kBF16 ? 1 : t == DataType::kHALF ? 2 : -1;
}

// BLOCK_R as kernels/fire.py picks it: min(64, max(16, next_power_of_2(rank))); rows of kPrologue/kInject
int rankBlock(int64_t rank)
{
    return rank <= 16 ? 0 : rank <= 32 ? 1 : 2;
}

constexpr int32_t kMaxHeads = 32; // H_PAD variants 16 and 32 (native/gen_kernels.py)
constexpr int32_t kBlockM = 64;   // FIRE's BLOCK_M, FIRE inject's BLOCK_D, MHMF pool's BLOCK_D
constexpr int32_t kErrorNoVariant = -100;
constexpr int32_t kErrorNotAliased = -101;
constexpr int32_t kErrorTooLarge = -102;

unsigned cdiv(int64_t a, int64_t b)
{
    return static_cast<unsigned>((a + b - 1) / b);
}

devptr ptr(void const* p)
{
    return reinterpret_cast<devptr>(p);
}

// ------------------------------------------------------------------------------ plugins
// One attribute per op: eps (float) or layer / num_heads (int).
struct Attribute
{
    char const* name;
    PluginFieldType type; // kFLOAT32 or kINT32
};

class Plugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuildV2, public IPluginV3OneRuntime
{
public:
    Plugin(char const* name, char const* types, Attribute attr, double value)
        : mName(name)
        , mTypes(types)
        , mAttr(attr)
        , mFloat(static_cast<float>(value))
        , mInt(static_cast<int32_t>(value))
    {
        mNbInputs = static_cast<int32_t>(std::strchr(types, '|') - types);
        mField = PluginField(mAttr.name, mAttr.type == PluginFieldType::kFLOAT32 ? static_cast<void const*>(&mFloat)
                                                                                  : &mInt, mAttr.type, 1);
        mFields.nbFields = 1;
        mFields.fields = &mField;
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return mName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return static_cast<int32_t>(std::strlen(mTypes)) - mNbInputs - 1;
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
        int32_t) noexcept override
    {
        return 0;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t) const noexcept override
    {
        for (int32_t i = 0; i < nbOutputs; ++i)
            outputTypes[i] = typeAt(mNbInputs + i, inputTypes[activationInput()]);
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override
    {
        // TensorRT asks position by position, 0..pos already fixed; the first 'x' input comes after
        // every fixed-type input before it, so its type decides every later 'x'
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
            return false;
        int32_t const anchor = activationInput();
        if (pos == anchor)
            return dtypeIndex(desc.type) >= 0 && hasKernel(dtypeIndex(desc.type));
        return desc.type == typeAt(pos, pos < anchor ? DataType::kFLOAT : inOut[anchor].desc.type);
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mFields; }

protected:
    virtual bool hasKernel(int dtype) const = 0; // a variant of this op for that dtype column

    char const* mName;
    char const* mTypes;
    Attribute mAttr;
    float mFloat;
    int32_t mInt;

private:
    // the type of tensor `pos` (inputs, then outputs) when the activations are `activation`
    DataType typeAt(int32_t pos, DataType activation) const
    {
        char const c = mTypes[pos < mNbInputs ? pos : pos + 1];
        return c == 'x' ? activation : c == 'f' ? DataType::kFLOAT : c == 'i' ? DataType::kINT32 : DataType::kINT64;
    }

    int32_t activationInput() const { return static_cast<int32_t>(std::strchr(mTypes, 'x') - mTypes); }

    int32_t mNbInputs;
    PluginField mField;
    PluginFieldCollection mFields{};
};

// r (N, R) = rmsnorm(z) @ w_down^T; inputs z (N, K), norm_weight (K,), w_down (R, K)
class FirePrologue final : public Plugin
{
public:
    static constexpr char const* kName = "FirePrologue";
    static constexpr Attribute kAttr{"eps", PluginFieldType::kFLOAT32};
    explicit FirePrologue(double eps)
        : Plugin(kName, "xxx|x", kAttr, eps)
    {
    }
    IPluginV3* clone() noexcept override { return new FirePrologue(mFloat); }

    int32_t getOutputShapes(DimsExprs const* in, int32_t, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
        IExprBuilder&) noexcept override
    {
        out[0].nbDims = 2;
        out[0].d[0] = in[0].d[0];
        out[0].d[1] = in[2].d[0];
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        int64_t const n = in[0].dims.d[0], k = in[0].dims.d[1], rank = in[2].dims.d[0];
        if (n == 0 || rank == 0)
            return 0;
        int const block = rankBlock(rank);
        PrologueFn fn = kPrologue[block][dtypeIndex(in[0].type)];
        if (!fn)
            return kErrorNoVariant;
        int32_t const N = static_cast<int32_t>(n), K = static_cast<int32_t>(k), R = static_cast<int32_t>(rank);
        return fn(stream, cdiv(n, kBlockM), cdiv(rank, 16 << block), 1, ptr(inputs[0]), K, ptr(inputs[1]),
            ptr(inputs[2]), K, ptr(outputs[0]), R, N, K, R, mFloat);
    }

protected:
    bool hasKernel(int dtype) const override { return kPrologue[0][dtype] != nullptr; }
};

// hidden_out = hidden with hidden[rows] += scale * (r @ up), in place: the output aliases input 0.
// inputs hidden (T, d), rows (N,) int32 (as the plugin graph exports them), r (N, R), up (R, d), scale (1,) fp32
class FireInject final : public Plugin
{
public:
    static constexpr char const* kName = "FireInject";
    static constexpr Attribute kAttr{"layer", PluginFieldType::kINT32};
    explicit FireInject(double layer)
        : Plugin(kName, "xixxf|x", kAttr, layer)
    {
    }
    IPluginV3* clone() noexcept override { return new FireInject(mInt); }

    int32_t getAliasedInput(int32_t outputIndex) noexcept override { return outputIndex == 0 ? 0 : -1; }

    int32_t getOutputShapes(DimsExprs const* in, int32_t, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
        IExprBuilder&) noexcept override
    {
        out[0] = in[0];
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        // the kernel updates rows in place: without the aliasing (builder preview feature
        // kALIASED_PLUGIN_IO_10_03) the output would miss the untouched rows
        if (outputs[0] != inputs[0])
            return kErrorNotAliased;
        int64_t const dim = in[0].dims.d[1], n = in[1].dims.d[0], rank = in[2].dims.d[1];
        if (n == 0 || dim == 0)
            return 0;
        InjectFn fn = kInject[rankBlock(rank)][dtypeIndex(in[0].type)];
        if (!fn)
            return kErrorNoVariant;
        int32_t const D = static_cast<int32_t>(dim), R = static_cast<int32_t>(rank);
        return fn(stream, cdiv(n, kBlockM), cdiv(dim, kBlockM), 1, ptr(outputs[0]), D, ptr(inputs[1]),
            ptr(inputs[2]), R, ptr(inputs[3]), D, ptr(inputs[4]), static_cast<int32_t>(n), R, D);
    }

protected:
    bool hasKernel(int dtype) const override { return kInject[0][dtype] != nullptr; }
};

// MHMF pass 1. inputs q (B, H, d) fp32, x_img (Ni, d), cu_img (B+1,), x_txt (Nt, d), cu_txt (B+1,);
// outputs s_img (H, Ni), s_txt (H, Nt), row_max (B, 2, H), row_sum (B, 2, H), all fp32
class FusionScores final : public Plugin
{
public:
    static constexpr char const* kName = "FusionScores";
    static constexpr Attribute kAttr{"num_heads", PluginFieldType::kINT32};
    explicit FusionScores(double heads)
        : Plugin(kName, "fxixi|ffff", kAttr, heads)
    {
    }
    IPluginV3* clone() noexcept override { return new FusionScores(mInt); }

    int32_t getOutputShapes(DimsExprs const* in, int32_t, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
        IExprBuilder& builder) noexcept override
    {
        IDimensionExpr const* heads = in[0].d[1];
        for (int32_t m = 0; m < 2; ++m) // s_img, s_txt
        {
            out[m].nbDims = 2;
            out[m].d[0] = heads;
            out[m].d[1] = in[1 + 2 * m].d[0];
        }
        for (int32_t s = 2; s < 4; ++s) // row_max, row_sum
        {
            out[s].nbDims = 3;
            out[s].d[0] = in[0].d[0];
            out[s].d[1] = builder.constant(2);
            out[s].d[2] = heads;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        int64_t const b = in[0].dims.d[0], h = in[0].dims.d[1], d = in[0].dims.d[2];
        if (b == 0 || h == 0 || d == 0)
            return 0;
        if (h > kMaxHeads)
            return kErrorTooLarge;
        ScoresFn fn = kScores[h > 16][dtypeIndex(in[1].type)];
        if (!fn)
            return kErrorNoVariant;
        int32_t const H = static_cast<int32_t>(h), D = static_cast<int32_t>(d);
        return fn(stream, static_cast<unsigned>(b), 2, 1, ptr(inputs[0]), H * D, D, ptr(inputs[1]), D,
            ptr(inputs[2]), ptr(outputs[0]), ptr(inputs[3]), D, ptr(inputs[4]), ptr(outputs[1]), ptr(outputs[2]),
            ptr(outputs[3]), H, D, static_cast<int32_t>(in[1].dims.d[0]), static_cast<int32_t>(in[3].dims.d[0]));
    }

protected:
    bool hasKernel(int dtype) const override { return kScores[0][dtype] != nullptr; }
};

// MHMF pass 2. inputs x_img, cu_img, s_img, x_txt, cu_txt, s_txt, row_max, row_sum, gate_logits (B, H, 2);
// output x_mix (B, H, d) in x_img's dtype
class FusionPool final : public Plugin
{
public:
    static constexpr char const* kName = "FusionPool";
    static constexpr Attribute kAttr{"num_heads", PluginFieldType::kINT32};
    explicit FusionPool(double heads)
        : Plugin(kName, "xifxiffff|x", kAttr, heads)
    {
    }
    IPluginV3* clone() noexcept override { return new FusionPool(mInt); }

    int32_t getOutputShapes(DimsExprs const* in, int32_t, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
        IExprBuilder&) noexcept override
    {
        out[0].nbDims = 3;
        out[0].d[0] = in[8].d[0];
        out[0].d[1] = in[8].d[1];
        out[0].d[2] = in[0].d[1];
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        int64_t const b = in[8].dims.d[0], h = in[8].dims.d[1], d = in[0].dims.d[1];
        if (b == 0 || h == 0 || d == 0)
            return 0;
        if (h > kMaxHeads || b > 65535) // B is the grid's y
            return kErrorTooLarge;
        PoolFn fn = kPool[h > 16][dtypeIndex(in[0].type)];
        if (!fn)
            return kErrorNoVariant;
        int32_t const H = static_cast<int32_t>(h), D = static_cast<int32_t>(d);
        return fn(stream, cdiv(d, kBlockM), static_cast<unsigned>(b), 1, ptr(inputs[0]), D, ptr(inputs[1]),
            ptr(inputs[2]), ptr(inputs[3]), D, ptr(inputs[4]), ptr(inputs[5]), ptr(inputs[6]), ptr(inputs[7]),
            ptr(inputs[8]), H * 2, 2, ptr(outputs[0]), H * D, D, H, D, static_cast<int32_t>(in[0].dims.d[0]),
            static_cast<int32_t>(in[3].dims.d[0]));
    }

protected:
    bool hasKernel(int dtype) const override { return kPool[0][dtype] != nullptr; }
};

// ----------------------------------------------------------------------------- creators
// Reads the op's one attribute (float or integer, any width) from the ONNX node's or the
// engine's fields; other fields (plugin_version, plugin_namespace, aot) are ignored.
bool readAttribute(PluginFieldCollection const* fc, char const* name, double& value)
{
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (!f.name || std::strcmp(f.name, name) != 0 || !f.data || f.length < 1)
            continue;
        switch (f.type)
        {
        case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(f.data); return true;
        case PluginFieldType::kFLOAT64: value = *static_cast<double const*>(f.data); return true;
        case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
        case PluginFieldType::kINT64: value = static_cast<double>(*static_cast<int64_t const*>(f.data)); return true;
        default: return false;
        }
    }
    return false;
}

template <class P>
class Creator final : public IPluginCreatorV3One
{
public:
    Creator()
    {
        mField = PluginField(P::kAttr.name, nullptr, P::kAttr.type, 1);
        mFields.nbFields = 1;
        mFields.fields = &mField;
    }

    IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        double value = 0;
        if (!readAttribute(fc, P::kAttr.name, value))
            return nullptr;
        if (std::strcmp(P::kAttr.name, "num_heads") == 0 && (value < 1 || value > kMaxHeads))
            return nullptr; // no H_PAD variant holds it
        try
        {
            return new P(value);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    PluginFieldCollection const* getFieldNames() noexcept override { return &mFields; }
    AsciiChar const* getPluginName() const noexcept override { return P::kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    PluginField mField;
    PluginFieldCollection mFields{};
};

Creator<FirePrologue> gFirePrologue;
Creator<FireInject> gFireInject;
Creator<FusionScores> gFusionScores;
Creator<FusionPool> gFusionPool;
IPluginCreatorInterface* const gCreators[] = {&gFirePrologue, &gFireInject, &gFusionScores, &gFusionPool};
} // namespace

// The entry point TensorRT looks up when it loads a plugin library (IPluginRegistry::loadLibrary);
// the only exported symbol (the target hides the rest).
extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));
    return gCreators;
}
