#!/usr/bin/env python3
# No import cycles between the crate's modules (issue 11).
# File-level "uses" graph of src/: an edge A -> B when A's non-test code names an item of module B
# (crate::x::y, super::x, self::x, or `pub use child::...`). Module declarations (`mod x;`) are containment, not uses.
import re,glob,sys
def modpath(f):
    rel=f[4:-3]
    return 'crate' if rel in('lib','main') else 'crate::'+rel.replace('/','::')
files={modpath(f):f for f in glob.glob('src/**/*.rs',recursive=True)}
mods=set(files)
def longest(path):
    parts=path.split('::')
    for n in range(len(parts),0,-1):
        p='::'.join(parts[:n])
        if p in mods: return p
    return None
graph={}
for m,f in files.items():
    if m=='crate': continue
    txt=open(f).read()
    i=txt.find('#[cfg(test)]\nmod tests')
    if i>=0: txt=txt[:i]
    txt=re.sub(r'//.*','',txt)
    deps=set()
    parent=m.rsplit('::',1)[0]
    # expand use trees crudely: take every path-like token
    for tok in re.findall(r'\b(?:crate|super|self)(?:::\{?[\w:]+)+',txt):
        tok=tok.replace('{','')
        if tok.startswith('super::'): tok=parent+tok[5:]
        elif tok.startswith('self::'): tok=m+tok[4:]
        t=longest(tok)
        if t and t!=m and t!='crate': deps.add(t)
    for g in re.findall(r'use crate::\{([^}]*)\}',txt,re.S):
        for p in re.findall(r'(\w+)::',g):
            t=longest('crate::'+p)
            if t and t!=m: deps.add(t)
    for p in re.findall(r'pub use (\w+)::',txt):
        t=longest(m+'::'+p)
        if t: deps.add(t)
    graph[m]=deps
if 'crate::testing' in graph: del graph['crate::testing']
for k in graph: graph[k]-= {'crate::testing'}
idx={};low={};st=[];on=set();res=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in graph.get(v,()):
        if w not in graph: continue
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        res.append(comp)
for v in graph:
    if v not in idx: sc(v)
cyc=[c for c in res if len(c)>1]
for comp in cyc: print('import cycle between modules:',', '.join(sorted(comp)))
if '-v' in sys.argv:
    for k in sorted(graph): print(k,'->',sorted(x.replace('crate::','') for x in graph[k]))
sys.exit(1 if cyc else 0)
