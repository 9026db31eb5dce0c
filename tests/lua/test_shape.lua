-- Views and their gradients: reshape/view, permute/transpose, (un)squeeze, expand, narrow,
-- select, slicing, chunk/split/unbind, cat/stack.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local gradcheck = require "gradcheck"

local function shp(t) return table.concat(t.shape, ",") end
local function rnd(shape, seed)
    return nemo.randn(shape, {dtype = "float64", generator = nemo.Generator(seed)}):requires_grad_()
end

local a = nemo.arange(24, {dtype = "float32"})
local v = a:view(2, 3, 4)
T.is(shp(v), "2,3,4", "view varargs")
T.is(shp(a:view{4, -1}), "4,6", "view with -1")
T.ok(v._c.storage == a._c.storage, "view shares storage")
T.raises(function() a:view(5, 5) end, "invalid for input of size 24", "view of the wrong size")
T.raises(function() a:view(-1, -1) end, "only one dimension can be %-1", "two -1")
local tr = v:transpose(1, 2)
T.is(shp(tr), "2,4,3", "transpose")
T.raises(function() tr:view(24) end, "not compatible", "view of a non-viewable transpose")
T.is(shp(tr:reshape(24)), "24", "reshape copies when needed")
T.is(tr:reshape(24):tolist()[2], 4, "reshape of a transpose has the transposed order")
T.is(shp(v:permute(2, 0, 1)), "4,2,3", "permute")
T.is(v:permute{2, 0, 1}:tolist()[2][1][3], 9, "permute values")
T.raises(function() v:permute(0, 1) end, "does not match", "permute with too few dims")
T.raises(function() v:permute(0, 0, 1) end, "repeats", "permute with a repeated dim")
T.is(shp(v:unsqueeze(0)), "1,2,3,4", "unsqueeze(0)")
T.is(shp(v:unsqueeze(-1)), "2,3,4,1", "unsqueeze(-1)")
T.is(shp(nemo.zeros(1, 3, 1):squeeze()), "3", "squeeze all")
T.is(shp(nemo.zeros(1, 3, 1):squeeze(0)), "3,1", "squeeze(0)")
T.is(shp(nemo.zeros(3, 1):expand(2, 3, 4)), "2,3,4", "expand adds leading dims")
T.is(shp(nemo.zeros(3, 1):expand(-1, 5)), "3,5", "expand with -1")
T.raises(function() nemo.zeros(3, 2):expand(3, 5) end, "must match the existing size", "bad expand")
T.is(shp(v:flatten(1)), "2,12", "flatten(1)")
T.is(shp(v:flatten()), "24", "flatten()")
T.is(shp(a:unflatten(0, {2, -1, 4})), "2,3,4", "unflatten")
T.is(shp(v:narrow(2, 1, 2)), "2,3,2", "narrow")
T.is(v:narrow(2, 1, 2):tolist()[1][1][1], 1, "narrow values")
T.raises(function() v:narrow(2, 3, 2) end, "exceeds", "narrow out of range")
T.is(shp(v:select(1, -1)), "2,4", "select negative index")
T.is(v:select(1, -1):tolist()[1][1], 8, "select values")
T.raises(function() v:select(1, 3) end, "out of range", "select out of range")

-- slicing
T.is(shp(v[{0}]), "3,4", "t[{0}]")
T.is(shp(v[1]), "3,4", "t[1] selects along dim 0 (0-based)")
T.is(shp(v[{":", {1, 3}}]), "2,2,4", "t[{':', {1, 3}}]")
T.is(shp(v[{"...", 0}]), "2,3", "ellipsis")
T.is(shp(v[{":", "none", 0}]), "2,1,4", "'none' inserts a dim")
T.is(table.concat(a[{{1, nil, 5}}]:tolist(), ","), "1,6,11,16,21", "step slice")
T.is(table.concat(a[{{-3}}]:tolist(), ","), "21,22,23", "negative start")
local z = nemo.zeros(3, 4)
z[{":", {1, 3}}] = 5
T.is(z:tolist()[3][2], 5, "slice assignment with a number")
z[{0}] = nemo.tensor({1, 2, 3, 4})
T.is(z:tolist()[1][4], 4, "slice assignment with a tensor")
T.raises(function() return v[{0, 0, 0, 0}] end, "too many indices", "too many indices")

-- chunk / split / unbind
local ch = a:chunk(5)
T.is(#ch, 5, "chunk(5) of 24 gives 5 pieces")
T.is(ch[5]:numel(), 4, "last chunk is smaller")
local sp = a:split({10, 14})
T.is(sp[2]:numel(), 14, "split with sizes")
T.raises(function() a:split({10, 10}) end, "add up to 20", "split sizes must add up")
T.is(#a:split(7), 4, "split(7)")
T.is(#v:unbind(1), 3, "unbind")

-- cat / stack
local c = nemo.cat({nemo.ones(2, 3), nemo.zeros(2, 1)}, 1)
T.is(shp(c), "2,4", "cat along dim 1")
T.is(c:tolist()[2][4], 0, "cat values")
T.is(nemo.cat({nemo.ones(2, {dtype = "bfloat16"}), nemo.ones(2)}).dtype, "float32", "cat promotes dtypes")
T.raises(function() nemo.cat({nemo.ones(2, 3), nemo.ones(3, 3)}, 1) end, "must match except in dimension 1", "cat shape mismatch")
local s = nemo.stack({nemo.ones(2, 3), nemo.zeros(2, 3)}, 1)
T.is(shp(s), "2,2,3", "stack along dim 1")
T.raises(function() nemo.stack({nemo.ones(2), nemo.ones(3)}) end, "equal size", "stack shape mismatch")

-- gradients
gradcheck(T, "reshape of transpose", function(x) return x:transpose(0, 1):reshape(-1) end, {rnd({3, 7}, 1)})
gradcheck(T, "permute", function(x) return x:permute(2, 0, 1) * 1 end, {rnd({3, 5, 2}, 2)})
gradcheck(T, "expand", function(x) return x:expand(4, 3, 5) end, {rnd({3, 1}, 3)})
gradcheck(T, "narrow+select", function(x) return x:narrow(1, 2, 3):select(0, 1) end, {rnd({3, 7}, 4)})
gradcheck(T, "step slice", function(x) return x[{{1, nil, 2}, {0, 5, 3}}] end, {rnd({7, 5}, 5)})
gradcheck(T, "chunk", function(x) local p = x:chunk(3, 1); return p[1] * 2 + p[3] end, {rnd({4, 9}, 6)})
gradcheck(T, "cat", function(x, y) return nemo.cat({x, y:t()}, 0) end, {rnd({2, 5}, 7), rnd({5, 3}, 8)})
gradcheck(T, "stack", function(x, y) return nemo.stack({x, y}, 1) end, {rnd({3, 4}, 9), rnd({3, 4}, 10)})
gradcheck(T, "unsqueeze/squeeze/flatten", function(x) return x:unsqueeze(1):squeeze(1):flatten() end, {rnd({3, 4}, 11)})

T.done()
