// Exercises libmoon3rt_trt_plugins without TensorRT's runtime (tests/test_native.py builds
// and runs it): creators, attributes, type combinations, output types, aliasing,
// serialisation, and an enqueue without a GPU. Arguments: the activation dtypes the library was
// built with (MOON3RT_DTYPES); the others must be refused. Exits non-zero on the first failure.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::printf("FAILED line %d: %s\n", __LINE__, #cond);                                                     \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

struct Op
{
    char const* name;
    char const* attr;
    char const* types; // as in the plugin: x activation, f fp32, i int32, l int64; '|' before the outputs
};

DataType typeOf(char c, DataType act)
{
    return c == 'x' ? act : c == 'f' ? DataType::kFLOAT : c == 'i' ? DataType::kINT32 : DataType::kINT64;
}

// every position accepted, in TensorRT's order, with the types the kernels take
bool accepts(IPluginV3OneBuild* build, std::vector<DynamicPluginTensorDesc> const& io, int32_t nbIn)
{
    for (int32_t pos = 0; pos < static_cast<int32_t>(io.size()); ++pos)
        if (!build->supportsFormatCombination(pos, io.data(), nbIn, static_cast<int32_t>(io.size()) - nbIn))
            return false;
    return true;
}

int main(int argc, char** argv)
{
    auto built = [&](char const* dtype) {
        for (int i = 1; i < argc; ++i)
            if (std::strcmp(argv[i], dtype) == 0)
                return true;
        return false;
    };
    Op const ops[] = {{"FirePrologue", "eps", "xxx|x"}, {"FireInject", "layer", "xixxf|x"},
        {"FusionScores", "num_heads", "fxixi|ffff"}, {"FusionPool", "num_heads", "xifxiffff|x"}};
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    CHECK(n == 4);
    for (int32_t c = 0; c < n; ++c)
    {
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[c]);
        Op const& op = ops[c];
        CHECK(std::strcmp(creator->getPluginName(), op.name) == 0);
        CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
        CHECK(std::strcmp(creator->getPluginNamespace(), "moon3rt") == 0);
        PluginFieldCollection const* names = creator->getFieldNames();
        CHECK(names->nbFields == 1 && std::strcmp(names->fields[0].name, op.attr) == 0);

        // as the ONNX parser passes them: the attribute plus the lookup attributes
        float const eps = 1e-6F;
        int64_t const heads = 8; // an int attribute, here 64-bit
        int32_t const aot = 1;
        PluginField fields[] = {{"plugin_namespace", "moon3rt", PluginFieldType::kCHAR, 7},
            {"aot", &aot, PluginFieldType::kINT32, 1},
            std::strcmp(op.attr, "eps") == 0 ? PluginField{op.attr, &eps, PluginFieldType::kFLOAT32, 1}
                                              : PluginField{op.attr, &heads, PluginFieldType::kINT64, 1}};
        PluginFieldCollection fc{3, fields};
        PluginFieldCollection missing{2, fields};
        CHECK(creator->createPlugin(op.name, &missing, TensorRTPhase::kBUILD) == nullptr);
        IPluginV3* plugin = creator->createPlugin(op.name, &fc, TensorRTPhase::kBUILD);
        CHECK(plugin != nullptr);
        auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
        auto* build = static_cast<IPluginV3OneBuildV2*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
        auto* run = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        CHECK(std::strcmp(core->getPluginName(), op.name) == 0);

        int32_t const nbIn = static_cast<int32_t>(std::strchr(op.types, '|') - op.types);
        int32_t const nbOut = static_cast<int32_t>(std::strlen(op.types)) - nbIn - 1;
        CHECK(build->getNbOutputs() == nbOut);
        CHECK(build->getAliasedInput(0) == (std::strcmp(op.name, "FireInject") == 0 ? 0 : -1));
        for (DataType act : {DataType::kFLOAT, DataType::kBF16, DataType::kHALF})
        {
            char const* dtype = act == DataType::kFLOAT ? "fp32" : act == DataType::kBF16 ? "bf16" : "fp16";
            std::vector<DynamicPluginTensorDesc> io;
            std::vector<DataType> inTypes;
            for (char const* t = op.types; *t; ++t)
            {
                if (*t == '|')
                    continue;
                DynamicPluginTensorDesc d{};
                d.desc.type = typeOf(*t, act);
                d.desc.format = TensorFormat::kLINEAR;
                io.push_back(d);
                if (static_cast<int32_t>(inTypes.size()) < nbIn)
                    inTypes.push_back(d.desc.type);
            }
            CHECK(accepts(build, io, nbIn) == built(dtype));
            if (!built(dtype))
                continue;
            std::vector<DataType> outTypes(nbOut);
            CHECK(build->getOutputDataTypes(outTypes.data(), nbOut, inTypes.data(), nbIn) == 0);
            for (int32_t o = 0; o < nbOut; ++o)
                CHECK(outTypes[o] == io[nbIn + o].desc.type);
            for (size_t pos = 0; pos < io.size(); ++pos) // any other type anywhere is refused
            {
                auto bad = io;
                bad[pos].desc.type = io[pos].desc.type == DataType::kINT32 ? DataType::kINT64 : DataType::kINT32;
                CHECK(!accepts(build, bad, nbIn));
                bad = io;
                bad[pos].desc.format = TensorFormat::kCHW32;
                CHECK(!accepts(build, bad, nbIn));
            }
        }

        // what the engine stores recreates the same plugin
        PluginFieldCollection const* saved = run->getFieldsToSerialize();
        CHECK(saved->nbFields == 1 && std::strcmp(saved->fields[0].name, op.attr) == 0);
        IPluginV3* again = creator->createPlugin(op.name, saved, TensorRTPhase::kRUNTIME);
        CHECK(again != nullptr);
        PluginField const& f = static_cast<IPluginV3OneRuntime*>(
            again->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize()->fields[0];
        CHECK(f.type == saved->fields[0].type && std::memcmp(f.data, saved->fields[0].data, 4) == 0);
        delete again;
        delete plugin;
    }

    // num_heads beyond the largest H_PAD variant (32) is refused
    int32_t const many = 64;
    PluginField tooMany{"num_heads", &many, PluginFieldType::kINT32, 1};
    PluginFieldCollection manyFc{1, &tooMany};
    CHECK(static_cast<IPluginCreatorV3One*>(creators[2])->createPlugin("x", &manyFc, TensorRTPhase::kBUILD) == nullptr);

    // FireInject refuses an output that is not its input 0; FirePrologue's launch reaches the
    // C library, which has no driver here (MOON3RT_ERROR_NO_DRIVER, or a CUDA error code)
    int32_t const layer = 3;
    PluginField layerField{"layer", &layer, PluginFieldType::kINT32, 1};
    PluginFieldCollection layerFc{1, &layerField};
    IPluginV3* inject
        = static_cast<IPluginCreatorV3One*>(creators[1])->createPlugin("x", &layerFc, TensorRTPhase::kRUNTIME);
    PluginTensorDesc in[5]{};
    for (auto& d : in)
        d.type = DataType::kFLOAT;
    in[0].dims = Dims2(100, 64);
    in[1].dims = Dims{1, {10}};
    in[2].dims = Dims2(10, 16);
    char buffers[2][8];
    void const* inputs[5] = {buffers[0], buffers[0], buffers[0], buffers[0], buffers[0]};
    void* outputs[1] = {buffers[1]};
    auto* injectRun = static_cast<IPluginV3OneRuntime*>(inject->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(injectRun->enqueue(in, in, inputs, outputs, nullptr, nullptr) == -101);
    delete inject;

    float const eps = 1e-6F;
    PluginField epsField{"eps", &eps, PluginFieldType::kFLOAT32, 1};
    PluginFieldCollection epsFc{1, &epsField};
    IPluginV3* prologue
        = static_cast<IPluginCreatorV3One*>(creators[0])->createPlugin("x", &epsFc, TensorRTPhase::kRUNTIME);
    in[0].dims = Dims2(10, 64);
    in[1].dims = Dims{1, {64}};
    in[2].dims = Dims2(16, 64);
    int32_t const code = static_cast<IPluginV3OneRuntime*>(prologue->getCapabilityInterface(
        PluginCapabilityType::kRUNTIME))->enqueue(in, in, inputs, outputs, nullptr, nullptr);
    CHECK(code != 0);
    std::printf("enqueue without a GPU returned %d\n", code);
    delete prologue;
    std::printf("ok\n");
    return 0;
}
